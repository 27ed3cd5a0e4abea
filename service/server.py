"""`keel serve`: make sure a model exists, then run the app on uvicorn with a graceful SIGTERM drain."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import uvicorn

from service.app import create_app
from service.settings import Settings, default_model_dir

log = logging.getLogger("keel.service")


def ensure_default_model(directory: Path) -> Path:
    """Train the default reward model into directory if it is not there yet (progress bar on stderr); re-export
    its ONNX graphs if an older Keel made its int8 graph with another recipe."""
    if (directory / "keel.json").exists():
        from training.artifact import read_manifest
        from training.onnx_export import int8_outdated

        if int8_outdated(read_manifest(directory).get("onnx", {})):
            from training.config import PACKAGE_ROOT
            from training.data import DataError
            from training.train_reward import reexport

            log.info("the default model's int8 graph was made by an older Keel: re-exporting it "
                     "(2-3 minutes on 2 CPU cores)")
            try:  # the default model's data is Keel's own, wherever this copy of Keel now lives
                reexport(directory, data_dir=PACKAGE_ROOT / "data")
            except DataError as error:
                log.warning("kept the default model's graphs as they are: %s", error)
        return directory
    from training.config import DEFAULT_REWARD_CONFIG, RewardConfig, load_config
    from training.train_reward import train_reward

    log.info("no model at %s: training the default reward model first (10-35 minutes on 2 CPU cores, by CPU)",
             directory)
    work = directory.parent / f"{directory.name}.work"
    train_reward(load_config(RewardConfig, DEFAULT_REWARD_CONFIG), directory, resume=work.exists())
    return directory


class DrainingServer(uvicorn.Server):
    """On SIGTERM: report not-ready for `drain_seconds` (so load balancers stop sending), then let uvicorn
    stop accepting, finish in-flight requests and run the app's shutdown."""

    def __init__(self, config: uvicorn.Config, drain_seconds: float):
        super().__init__(config)
        self.drain_seconds = drain_seconds
        self._draining = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self.config.app.state.keel
        if sig == signal.SIGTERM and not self._draining and self.drain_seconds > 0:
            self._draining = True
            state.draining = True
            log.info("SIGTERM: draining for %.1f s before shutdown", self.drain_seconds)
            threading.Timer(self.drain_seconds, super().handle_exit, (sig, frame)).start()
            return
        state.draining = True
        super().handle_exit(sig, frame)


def serve(settings: Settings) -> None:
    if settings.model is None:
        settings.model = ensure_default_model(default_model_dir())
    app = create_app(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                            timeout_graceful_shutdown=max(settings.request_timeout_s, 1.0), access_log=False)
    DrainingServer(config, settings.drain_seconds).run()
