"""The peer a user would otherwise write: a FastAPI endpoint that runs a transformers `pipeline` per request
(feature extraction, mean pooling, then the Keel heads), no batching across requests. Same model files."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import uvicorn
from fastapi import FastAPI
from safetensors.torch import load_file
from transformers import pipeline


def build(model_dir: str) -> FastAPI:
    extractor = pipeline("feature-extraction", model=model_dir, tokenizer=model_dir, device=-1)
    heads = load_file(Path(model_dir) / "reward_heads.safetensors")
    app = FastAPI()

    @app.post("/v1/score")
    def score(body: dict) -> dict:
        data = []
        for i, item in enumerate(body["input"]):
            hidden = extractor(item["text"], return_tensors=True, tokenize_kwargs={"truncation": True, "max_length": 256})
            pooled = hidden[0].mean(0)
            scores = (heads["weight"] @ pooled + heads["bias"]).tolist()
            data.append({"index": i, "score": scores[0]})
        return {"data": data}

    return app


if __name__ == "__main__":
    torch.set_num_threads(2)
    uvicorn.run(build(sys.argv[1]), host="127.0.0.1", port=int(sys.argv[2]), log_level="warning")
