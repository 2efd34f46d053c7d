"""memetrain: self- and semi-supervised training of multimodal meme classifiers."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``memetrain.load_model(path)``: a trained model bundle (imported on first use: ``import
    memetrain`` stays free of torch for the processes that need none, like a sweep's jobs)."""
    if name == "load_model":
        from memetrain.bundle import load_model

        return load_model
    raise AttributeError(f"module 'memetrain' has no attribute {name!r}")
