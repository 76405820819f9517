# The image of every part (api, worker, agent): nap-orch with what instances and MPI builds need
# (mpicc and mpirun, bubblewrap and util-linux's unshare for the sandbox, setpriv for MPI builds, git for deploys from repositories).
FROM python:3.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends git bubblewrap util-linux openmpi-bin libopenmpi-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN pip install --no-cache-dir .
CMD ["nap", "api"]
