# One image for every Tidegate component; compose.yaml picks the command.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY mesh ./mesh
COPY executor ./executor
COPY console ./console
COPY templates ./templates
COPY migrations ./migrations
# The server and console extras: drivers, executors and the console need them (the bare
# package is the client SDK alone), and `nats-config` hashes passwords with bcrypt.
RUN pip install '.[server,console]' && rm -rf /src

# Components run as `tidegate`: none needs root. Only an executor gains by it: as root it runs
# its tasks as another user. compose.yaml runs it so, with TIDEGATE_TASK_USER=tidegate-task (a
# user for the tasks alone, with a home). It changes user through `setpriv` and sets limits
# through `prlimit`, both from util-linux, an essential package of Debian (this image's base).
RUN useradd --create-home --uid 10001 tidegate && mkdir /data && chown tidegate /data \
    && useradd --create-home --uid 10002 tidegate-task
USER tidegate
WORKDIR /data
ENV TIDEGATE_DATA_DIR=/data

ENTRYPOINT ["tidegate"]
CMD ["--help"]
