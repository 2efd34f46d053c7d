"""A chunk's read samples to a batch: decoded, each image's view made, collated.

Sample ``i`` of a chunk is row ``i`` of its batch. A bad sample (a problem the index recorded, an
undecodable image, text that is not UTF-8) is counted and logged by key, and its row becomes a
copy of the batch's first good sample, its id too, marked ``valid=False`` as padding is: every
batch keeps its planned size, so every rank's does (a collective over batches of unequal sizes
hangs, and rank-offset labels would be wrong). A batch of bad samples only is a StreamError.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from memetrain.data.decode import (
    STORE_ALIGNMENT,
    BadSample,
    Row,
    SampleDecoder,
    cached_rows,
    decode_jpeg_rows,
)
from memetrain.data.sample_index import SampleIndex
from memetrain.data.shared_batches import SharedBatches
from memetrain.data.slot_samples import Sample
from memetrain.data.stream_error import StreamError
from memetrain.data.tokenizer import TextEncoder, TokenTable

log = logging.getLogger(__name__)


class BatchAssembler:
    """Makes the batches of a stream: its index (keys, problems, labels), view, text encoder and
    packed token ids, and the seed its views' randomness is drawn from."""

    def __init__(
        self,
        index: SampleIndex,
        view: Callable,
        text_encoder: TextEncoder | None,
        tokens: TokenTable | None,
        seed: int,
    ):
        self.index, self.keys = index, index.keys.tolist()
        self.problems = {int(row): str(index.problems[row]) for row in np.flatnonzero(index.problems != "")}
        self.decoder = SampleDecoder(view.decode_size)
        self.view, self.text_encoder, self.tokens, self.seed = view, text_encoder, tokens, seed

    def __call__(
        self, chunk: list[Sample], epoch: int, slot: int, position: int, shared: SharedBatches | None
    ) -> tuple[dict[str, Any], int]:
        """The batch of ``chunk``'s samples, one row each, images written into ``shared`` (None:
        fresh tensors), and how many samples were bad (see the module docstring)."""
        rows, keys, texts, valid, bad = [], [], [], [], []
        if shared is not None:
            shared.start()
        images = _BatchImages(len(chunk), shared)
        passed_through = False  # natively decoded rows are the view itself: the view need not be called
        for offset, (row, image_bytes, text_bytes, pad) in enumerate(chunk):
            key = self.keys[row]
            if images.rest_in_rows:  # the rest of the batch's JPEGs in one native call
                images.decode_rows([sample[1] for sample in chunk[offset:]], first=offset)
                passed_through = not self.view.random and _passes_through(self.view, *images.row_size)
            try:
                if row in self.problems:
                    raise BadSample(key, self.problems[row])
                text = self.decoder.text(key, text_bytes)
                taken = passed_through and images.take_decoded(offset)
                if not taken:
                    image = images.decoded(offset)
                    if image is None:
                        image = self.decoder.image(key, image_bytes, images.next_row())
            except BadSample as problem:
                log.warning("skipping bad %s (its row holds a copy of another sample, valid=False)", problem)
                images.skip()
                bad.append(offset)
                text = ""  # its id, text and labels become a good sample's, below
            else:
                if not taken:
                    # seeding a generator costs a third of a JPEG decode: only views that draw get one
                    rng = (
                        np.random.default_rng([self.seed, epoch, slot, position + offset])
                        if self.view.random
                        else None
                    )
                    images.add(key, self.view(image, rng), image)
            rows.append(row)
            keys.append(key)
            texts.append(text)
            valid.append(not pad and offset not in bad)
        if len(bad) == len(chunk):
            raise StreamError(
                f"every sample of a batch was bad (first: {self.keys[chunk[0][0]]!r}); the shards need fixing"
            )
        good = next(offset for offset in range(len(chunk)) if offset not in bad)
        for offset in bad:
            images.repeat(good, offset)
            rows[offset], keys[offset], texts[offset] = rows[good], keys[good], texts[good]
        batch: dict[str, Any] = {"id": keys, "text": texts, "bad_samples": len(bad)}
        batch.update(images.batched())
        if shared is not None:
            shared.finish(batch)
        # small arrays stay numpy until the main process (see MemeStream._small_tensors)
        batch["labels"] = self.index.labels[rows].astype(np.int64)
        batch["valid"] = np.asarray(valid, dtype=bool)
        if self.tokens is not None:
            batch["input_ids"], batch["attention_mask"] = self.text_encoder.pad(self.tokens, rows)
        elif self.text_encoder is not None:
            batch["input_ids"], batch["attention_mask"] = self.text_encoder(texts)
        return batch, len(bad)


class _BatchImages:
    """A batch's images, each written into its row of the batch tensor as soon as its view is
    made, while it is still in the CPU's cache (in a worker, straight into the shared buffer that
    carries it to the main process). Rows are HWC, so the batch is channels last and each write a
    plain copy. Once the batch's image size is known, :meth:`next_row` offers the next row to the
    decoder: an image of that very size is decoded into it, and a view that returns it unchanged
    (``Resize`` of an image packed at the view's size) costs no copy and no check. When the first
    image had the rows' size, :meth:`decode_rows` decodes the rest of the batch's JPEGs into
    their rows in one native call. Sample ``i`` of the batch is row ``i``: a bad sample's row is
    skipped, then filled with another's (:meth:`repeat`)."""

    def __init__(self, capacity: int, shared: SharedBatches | None):
        self.capacity, self.shared = capacity, shared
        self.count, self.multi_view = 0, False
        self._buffers: list[torch.Tensor] = []  # per view of a sample: [capacity, H, W, C]
        self._rows: np.ndarray | None = None  # a single uint8 view's buffer, as numpy, once made
        self._pixels: list[np.ndarray] = []  # its rows, made when first asked for (see _row_views)
        self._images: tuple[torch.Tensor, ...] = ()  # the same rows as [C, H, W] tensors
        self.rest_in_rows = False  # the first image had the rows' size, and decode_rows is still to come
        self._statuses, self._first = b"", 0  # of decode_rows

    @property
    def row_size(self) -> tuple[int, int]:
        return self._rows.shape[1:3]

    def next_row(self) -> Row | None:
        if self._rows is None:
            return None
        self._row_views()
        return Row(self._pixels[self.count], self._images[self.count])

    def decode_rows(self, images: list[bytes], first: int) -> None:
        """Decode ``images``, the batch's samples from ``first`` on, into their rows (see
        :meth:`take_decoded`); without the native decoder, nothing."""
        statuses = decode_jpeg_rows(images, self._rows[first : first + len(images)])
        self._statuses, self._first = statuses or b"", first
        self.rest_in_rows = False

    def take_decoded(self, sample: int) -> bool:
        """Whether :meth:`decode_rows` decoded the batch's sample ``sample``; if so its image,
        which needs no view, is taken as the next row."""
        if not self._natively_decoded(sample):
            return False
        self.count += 1
        return True

    def decoded(self, sample: int) -> torch.Tensor | None:
        """The image of sample ``sample`` if :meth:`decode_rows` decoded it, in the next row, for
        its view to be made (None: it must be decoded)."""
        if not self._natively_decoded(sample):
            return None
        self._row_views()
        return self._images[self.count]

    def _natively_decoded(self, sample: int) -> bool:
        """Whether sample ``sample`` (the next row's) was decoded by :meth:`decode_rows`."""
        at = sample - self._first
        return 0 <= at < len(self._statuses) and bool(self._statuses[at])

    def skip(self) -> None:
        """Leave the next row (a bad sample's) to be filled by :meth:`repeat`."""
        self.count += 1

    def repeat(self, source: int, target: int) -> None:
        """Copy row ``source`` (every view of it) into row ``target``."""
        for buffer in self._buffers:
            buffer[target].copy_(buffer[source])

    def add(self, key: str, view: torch.Tensor | list[torch.Tensor], decoded: torch.Tensor) -> None:
        """Write the ``view`` made of image ``decoded`` into the next row."""
        if self._images and view is self._images[self.count]:
            self.count += 1  # decoded into its row and passed through unchanged
            return
        images = view if isinstance(view, list) else [view]
        if not self._buffers:
            self.multi_view = isinstance(view, list)
            self._buffers = [self._empty(image) for image in images]
            if not self.multi_view and view.dtype == torch.uint8:
                self._rows = self._buffers[0].numpy()
                self.rest_in_rows = decoded.shape == view.shape
        for index, (buffer, image) in enumerate(zip(self._buffers, images, strict=True)):
            row, hwc = buffer[self.count], image.permute(1, 2, 0)
            if hwc.shape != row.shape or image.dtype != row.dtype:
                which = f"image {index} of its views" if self.multi_view else "image"
                raise StreamError(
                    f"the view made a {tuple(image.shape)} {image.dtype} {which} of sample {key!r}, unlike "
                    f"the {tuple(buffer[0].permute(2, 0, 1).shape)} {buffer.dtype} of the batch's first "
                    "sample: a view must give every image one size and dtype"
                )
            if hwc.data_ptr() == row.data_ptr() and hwc.stride() == row.stride():
                continue  # decoded into the row, passed through unchanged
            if hwc.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                hwc = hwc.clone()  # a view of the row itself (say, transposed) would be overwritten as read
            if self._rows is not None:
                np.copyto(self._rows[self.count], hwc.numpy())  # numpy's copy: no intra-op threads
            else:
                row.copy_(hwc)
        self.count += 1

    def _row_views(self) -> None:
        """Each row as numpy HWC and as a [C, H, W] tensor (128 objects: made only when needed)."""
        if not self._images:
            self._pixels = list(self._rows)
            self._images = self._buffers[0].permute(0, 3, 1, 2).unbind(0)

    def _empty(self, image: torch.Tensor) -> torch.Tensor:
        channels, height, width = image.shape
        shape = (self.capacity, height, width, channels)
        if self.shared is not None:
            return self.shared.empty(shape, image.dtype)
        if image.dtype != torch.uint8:
            return torch.empty(shape, dtype=image.dtype)
        return cached_rows(
            torch.empty(math.prod(shape) + STORE_ALIGNMENT, dtype=torch.uint8).untyped_storage(), shape
        )

    def batched(self) -> dict[str, Any]:
        """``image`` (or ``views``): ``[B, C, H, W]`` of the rows written, channels-last memory."""
        tensors = [buffer[: self.count].permute(0, 3, 1, 2) for buffer in self._buffers]
        return {"views": tensors} if self.multi_view else {"image": tensors[0]}


def _passes_through(view: Callable, height: int, width: int) -> bool:
    """Whether ``view`` says it returns an image of this size unchanged (``Resize.passes_through``)."""
    passes_through = getattr(view, "passes_through", None)
    return passes_through is not None and passes_through(height, width)
