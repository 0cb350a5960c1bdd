# The app's image, for compose.yaml: the pinned requirements, installed with --no-deps as the Makefile does.
# PyPI's Linux torch wheel is the CUDA build, which needs the nvidia-* wheels that --no-deps leaves out,
# so torch comes from PyTorch's CPU index by default. For GPUs (--device-map auto), build with
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 --build-arg TORCH_DEPS=1 .
# which installs that index's torch with its CUDA libraries.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_DEPS=0
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --no-deps --extra-index-url "$TORCH_INDEX" -r requirements.txt \
 && if [ "$TORCH_DEPS" = 1 ]; then \
      pip uninstall -y torch && pip install --no-cache-dir --index-url "$TORCH_INDEX" "$(grep '^torch==' requirements.txt)"; \
    fi
COPY . .
ENV GRADIO_ANALYTICS_ENABLED=False ROME_CHAT_CACHE=/cache
EXPOSE 7860
ENTRYPOINT ["python", "app.py", "--host", "0.0.0.0"]
