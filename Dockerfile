# The app's image, for compose.yaml: the pinned requirements (installed with --no-deps, as the Makefile does).
FROM python:3.11-slim
WORKDIR /app
COPY requirements.txt .
RUN pip install --no-cache-dir --no-deps -r requirements.txt
COPY . .
ENV GRADIO_ANALYTICS_ENABLED=False ROME_CHAT_CACHE=/cache
EXPOSE 7860
ENTRYPOINT ["python", "app.py", "--host", "0.0.0.0"]
