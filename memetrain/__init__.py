"""memetrain: self- and semi-supervised training of multimodal meme classifiers."""

__version__ = "0.1.0"
