"""CUDA agreement tests (run on the GPU machine: `python -m pytest -m gpu tests/stages/test_gpu.py`)."""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _frames(assets, count=16):
    import decord

    reader = decord.VideoReader(str(assets / "data/sadtalker_hdtf/WDA_AlexandriaOcasioCortez_000.mp4"))
    return torch.from_numpy(reader.get_batch(list(range(0, 4 * count, 4))).asnumpy())


def test_detector_cuda_fp16_matches_cpu(assets, models_dir):
    from avatarcli.face.scrfd import SCRFD, detect

    path = models_dir / "face_detection/scrfd_2.5g_bnkps.onnx"
    frames = _frames(assets)
    cpu = detect(SCRFD(path, "cpu"), frames, 640)
    gpu = detect(SCRFD(path, "cuda", half=True), frames.cuda(), 640)
    for a, b in zip(cpu, gpu):
        assert len(a.boxes) == len(b.boxes) == 1
        np.testing.assert_allclose(b.boxes.cpu().numpy(), a.boxes.numpy(), atol=2.0)
        np.testing.assert_allclose(b.kps.cpu().numpy(), a.kps.numpy(), atol=2.0)


def test_landmarks_and_crops_cuda_match_cpu(assets, models_dir):
    from avatarcli.face.crop import crop_batch
    from avatarcli.face.landmarks import PFLD68

    frames = _frames(assets)
    boxes = np.tile(np.array([[150.0, 100.0, 360.0, 360.0]]), (len(frames), 1))
    path = models_dir / "landmarks68/pfld_68.onnx"
    cpu = PFLD68(path, "cpu")(frames, boxes)
    gpu = PFLD68(path, "cuda", half=True)(frames.cuda(), boxes)
    assert np.abs(gpu - cpu).mean() < 1.0
    int_boxes = np.tile(np.array([[-20, 40, 300]]), (len(frames), 1))
    crop_cpu = crop_batch(frames, int_boxes, 256).numpy().astype(int)
    crop_gpu = crop_batch(frames.cuda(), int_boxes, 256).cpu().numpy().astype(int)
    assert np.abs(crop_cpu - crop_gpu).max() <= 2
    assert (crop_gpu[:, :, :10] == 0).all()  # zero padding left of the frame


def test_preprocess_stage_on_cuda(assets, models_dir, tmp_path):
    from avatarcli.artifact import open_artifact
    from stages.preprocess import PreprocessConfig, run

    config = PreprocessConfig(device="cuda", models_dir=str(models_dir))
    summary = run(config, [str(assets / "data/video_retalking/face5.mp4")], tmp_path / "clips.h5")
    assert summary.columns["clips"] == 1 and summary.device == "cuda"
    with open_artifact(tmp_path / "clips.h5", "clips", deep=True) as h:
        name = list(h["clips"])[0]
        clip = h["clips"][name]
        assert clip["detected"][()].all() and clip["landmarked"][()].all()
        frames, boxes, source_frame = clip["frames"][()], clip["boxes"][()], clip["source_frame"][()]
    # every crop came back (async, page-locked copies) into its own slot: re-crop the source frames
    # on the CPU with the stored boxes
    import decord

    from avatarcli.face.crop import crop_batch

    source = decord.VideoReader(str(assets / "data/video_retalking/face5.mp4")).get_batch(list(source_frame)).asnumpy()
    int_boxes = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0]], 1).round().astype(np.int64)
    again = crop_batch(torch.from_numpy(source), int_boxes, frames.shape[1]).numpy()
    assert np.abs(again.astype(int) - frames.astype(int)).max() <= 2


def test_onnx_traces_are_cached_on_disk(models_dir, tmp_path, monkeypatch):
    """A second network object loads the frozen trace the first one saved, with equal outputs."""
    from avatarcli.onnx_torch import OnnxNet

    monkeypatch.setenv("AVATAR_TRACE_CACHE", str(tmp_path))
    path = models_dir / "landmarks68" / "pfld_68.onnx"
    x = torch.rand(8, 3, 112, 112, device="cuda")
    first = OnnxNet(path, torch.device("cuda"))(x)
    saved = list(tmp_path.glob("pfld_68-*.pt"))
    assert len(saved) == 1
    second_net = OnnxNet(path, torch.device("cuda"))
    second = second_net(x)
    assert isinstance(second_net._traced[(8, 3, 112, 112)], torch.jit.ScriptModule)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    saved[0].write_bytes(b"damaged")  # a damaged cache file is traced again, not an error
    third = OnnxNet(path, torch.device("cuda"))(x)
    assert torch.equal(third[0], first[0])
