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

# Components (and the tasks an executor runs) do not need root.
RUN useradd --create-home --uid 10001 tidegate && mkdir /data && chown tidegate /data
USER tidegate
WORKDIR /data
ENV TIDEGATE_DATA_DIR=/data

ENTRYPOINT ["tidegate"]
CMD ["--help"]
