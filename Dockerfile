# One image for every service of docker-compose.yml: the fedpriv CLI, the
# examples, and a CPU build of PyTorch (the pinned versions of constraints.txt).
FROM python:3.11-slim

WORKDIR /srv/fedpriv
COPY pyproject.toml constraints.txt README.md ./
COPY proto ./proto
COPY fedpriv ./fedpriv
COPY examples ./examples
# PyTorch's CPU wheels: PyPI's default Linux build carries CUDA (several GB).
RUN pip install --no-cache-dir \
        --extra-index-url https://download.pytorch.org/whl/cpu \
        -c constraints.txt '.[examples]'

ENV PYTHONPATH=/srv/fedpriv \
    PYTHONUNBUFFERED=1
# Nothing runs as root inside. A new named volume takes the owner of the folder
# it is mounted on, so every mount point exists here, owned by that user.
RUN useradd --create-home --uid 10001 fedpriv \
    && mkdir -p /srv/pki/ca /srv/pki/coordinator /srv/pki/silo-1 /srv/pki/silo-2 \
        /srv/pki/silo-3 /srv/state /srv/data \
    && chown -R fedpriv /srv/pki /srv/state /srv/data
USER fedpriv
CMD ["fedpriv", "--help"]
