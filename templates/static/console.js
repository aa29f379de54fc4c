// Every page. htmx drops a 4xx/5xx answer by default, so a refused action (bad input, a server
// down, a viewer's role) would vanish without a word: show its text in the flash box instead.
// A file rather than inline script: the console's Content-Security-Policy allows no inline code.
(function () {
  function flash(text) {
    const box = document.getElementById("flash");
    if (!box) return;
    box.textContent = text;
    box.hidden = false;
  }
  function textOf(html) {
    const doc = new DOMParser().parseFromString(html, "text/html");
    return (doc.body.textContent || "").trim();
  }
  document.addEventListener("htmx:beforeSwap", function (event) {
    const d = event.detail;
    if (d.elt && d.elt.closest && d.elt.closest("[data-executor-action]")) return; // executors.js
    if (d.xhr.status >= 400) {
      d.shouldSwap = false;
      flash(textOf(d.xhr.responseText) || "the console answered " + d.xhr.status);
    } else {
      const box = document.getElementById("flash");
      if (box) box.hidden = true;
    }
  });
  document.addEventListener("htmx:sendError", function () {
    flash("the console did not answer: nothing was sent");
  });
})();
