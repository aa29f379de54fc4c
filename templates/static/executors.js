// The Executors page. A refused cordon, uncordon or drain answers 4xx/5xx with a plain sentence
// (NATS down, executor gone, viewer role), which htmx would drop: show it instead, as text.
// A file rather than inline script: the console's Content-Security-Policy allows no inline code.
(function () {
  function box() {
    return document.getElementById("executors-error");
  }
  function isAction(detail) {
    return detail.elt && detail.elt.matches && detail.elt.matches("[data-executor-action]");
  }
  function show(text) {
    const b = box();
    if (b) {
      b.textContent = text;
      b.hidden = false;
    }
  }
  document.addEventListener("htmx:beforeSwap", function (event) {
    const d = event.detail;
    if (!isAction(d)) return;
    if (d.xhr.status >= 400) {
      d.shouldSwap = false;
      show(d.xhr.responseText || "the console answered " + d.xhr.status);
    } else if (box()) {
      box().hidden = true;
    }
  });
  document.addEventListener("htmx:sendError", function (event) {
    if (isAction(event.detail)) show("the console did not answer: nothing was sent");
  });
})();
