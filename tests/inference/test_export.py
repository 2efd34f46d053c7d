"""A bundle exported to ONNX and TorchScript reproduces its probabilities on real memes; an export
that does not is refused and leaves nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import run_launcher

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(("format", "suffix"), [("onnx", ".onnx"), ("torchscript", ".pt")])
def test_an_export_scores_new_memes_as_the_bundle_does(bundle, synth_shards, tmp_path, format, suffix):
    output = tmp_path / f"fusion{suffix}"
    result = run_launcher(
        "export.py", f"model={bundle}", f"format={format}", f"output={output}", f"check_input={synth_shards}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"exported {bundle} as {format}: {output} (checked on 16 memes of {synth_shards}/test"
        in result.stdout
    )
    beside = json.loads((tmp_path / "fusion.bundle.json").read_text())
    assert beside["inputs"] == ["image", "input_ids", "attention_mask"] and beside["targets"] == ["hateful"]
    assert (tmp_path / "fusion.tokenizer.json").is_file()

    # the file alone, on memes of another split and another batch size than it was checked on
    import memetrain
    from memetrain.data.stream import MemeStream, StreamSettings

    model = memetrain.load_model(bundle)
    batch = next(
        iter(
            MemeStream(
                synth_shards,
                "dev",
                StreamSettings(batch_size=5, shuffle=False, num_workers=0),
                model.view,
                model.text_encoder,
            )
        )
    )
    inputs = {name: batch[name].numpy() for name in beside["inputs"]}
    expected = model.predict_batch(batch).numpy()
    if format == "onnx":
        import onnxruntime

        got = onnxruntime.InferenceSession(str(output)).run(None, inputs)[0]
    else:
        import torch

        with torch.no_grad():
            got = torch.jit.load(str(output))(*(torch.from_numpy(v) for v in inputs.values())).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_an_export_outside_its_tolerance_is_refused_and_leaves_nothing(bundle, synth_shards, tmp_path):
    output = tmp_path / "fusion.onnx"
    result = run_launcher(
        "export.py", f"model={bundle}", f"output={output}", f"check_input={synth_shards}", "tolerance=0"
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.startswith(f"error: the onnx export of {bundle} gives probabilities up to ")
    assert "(tolerance 0); nothing was written" in result.stderr
    assert list(tmp_path.iterdir()) == []
