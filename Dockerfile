# facetool for GPU machines: CUDA runtime base, the same install script as on a bare machine
# installing the same hashed pins from requirements.lock (matched torch + torchvision from PyPI,
# onnxruntime-gpu as the only ONNX Runtime).
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-dev \
        build-essential libgl1 libglib2.0-0 && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/facetool
COPY pyproject.toml README.md requirements.lock ./
COPY scripts ./scripts
COPY facetool ./facetool
COPY recipes ./recipes
RUN bash scripts/setup.sh
ENV PATH=/opt/facetool/.venv/bin:$PATH
WORKDIR /work
ENTRYPOINT ["facetool"]
CMD ["--help"]
