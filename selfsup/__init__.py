"""selfsup: distributed self-supervised pretraining on WebDataset shards.

The library API, imported on first use (``import selfsup`` loads no torch):

- ``selfsup.pretrain(cfg, use_ray=True, address=None, restart=False)``: train a config
  (``selfsup.config.load_config``) under Ray Train or in this process; returns the summary. The one way
  to train: the command line, ``selfsup submit``'s job and the benchmarks call it too.
- ``selfsup.evaluate(checkpoint, train, test, out=None)``: score a checkpoint's encoder; writes and returns the report.
- ``selfsup.load_encoder(run_or_checkpoint, device="cpu")``: the trained encoder in eval mode, its input
  (``mean``, ``std``, ``image_size``, ``channels``) attached.
"""

from selfsup._version import __version__

__all__ = ["__version__", "evaluate", "load_encoder", "pretrain"]


def __getattr__(name: str):
    if name == "pretrain":
        from selfsup.cluster.driver import pretrain

        return pretrain
    if name == "evaluate":
        from selfsup.eval.run import evaluate

        return evaluate
    if name == "load_encoder":
        from selfsup.eval.features import load_encoder

        return load_encoder
    raise AttributeError(f"module 'selfsup' has no attribute {name!r}")
