"""The peer a user would otherwise write: a FastAPI endpoint that runs the model directory through a transformers
`pipeline("text-classification", model=DIR, trust_remote_code=True, top_k=None)` per request, one text at a
time, no batching across requests. Same model files as Keel serves."""

from __future__ import annotations

import sys

import torch
import uvicorn
from fastapi import FastAPI
from transformers import pipeline


def build(model_dir: str) -> FastAPI:
    classify = pipeline("text-classification", model=model_dir, trust_remote_code=True, top_k=None, device=-1)
    primary = classify.model.config.id2label[0]
    app = FastAPI()

    @app.post("/v1/score")
    def score(body: dict) -> dict:
        data = []
        for i, item in enumerate(body["input"]):
            [labels] = classify([{"text": "", "text_pair": item["text"]}], truncation=True)
            data.append({"index": i, "score": next(label["score"] for label in labels if label["label"] == primary)})
        return {"data": data}

    return app


if __name__ == "__main__":
    torch.set_num_threads(2)
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
