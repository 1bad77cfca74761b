"""The detector and landmark models in torch/onnxruntime against references."""

import cv2
import numpy as np
import onnxruntime as ort
import pytest
import torch

from avatarcli.face.landmarks import PFLD68
from avatarcli.face.scrfd import SCRFD, detect, detect_best


@pytest.fixture(scope="module")
def scrfd_path(models_dir):
    return models_dir / "face_detection" / "scrfd_2.5g_bnkps.onnx"


def test_detections_match_insightface_reference(assets, scrfd_path):
    from insightface.model_zoo.scrfd import SCRFD as ReferenceSCRFD

    bgr = cv2.imread(str(assets / "data" / "images" / "insightface_t1.jpg"))
    reference = ReferenceSCRFD(model_file=str(scrfd_path))
    reference.prepare(-1, input_size=(640, 640), det_thresh=0.5)
    ref_boxes, ref_kps = reference.detect(bgr, input_size=(640, 640))
    assert len(ref_boxes) == 6

    ours = detect(SCRFD(scrfd_path, "cpu"), torch.from_numpy(bgr[..., ::-1].copy())[None], det_size=640, pad=0.0)[0]
    assert len(ours.boxes) == 6
    order = np.argsort(ours.boxes[:, 0].numpy())
    ref_order = np.argsort(ref_boxes[:, 0])
    # Our letterbox resize is antialiased (insightface's is not): a few pixels of box jitter at most.
    np.testing.assert_allclose(ours.boxes.numpy()[order], ref_boxes[ref_order, :4], atol=4.0)
    np.testing.assert_allclose(ours.kps.numpy()[order], ref_kps[ref_order], atol=3.0)


def test_batched_equals_single_and_torch_equals_onnxruntime(assets, scrfd_path):
    frames = [cv2.imread(str(p))[..., ::-1] for p in sorted((assets / "data" / "deep3d_examples").glob("0000*.jpg"))[:3]]
    size = min(min(f.shape[:2]) for f in frames)
    batch = torch.from_numpy(np.stack([np.ascontiguousarray(f[:size, :size]) for f in frames]))
    torch_backend = SCRFD(scrfd_path, "cpu")
    # the same graph through onnx2torch on the CPU (what CUDA runs)
    from avatarcli.onnx_torch import OnnxNet, _load_onnx, head_inputs_before
    from avatarcli.face.scrfd import prepare_batch

    net_input, _, _ = prepare_batch(batch, 320, 0.25)
    from onnx2torch import convert
    from avatarcli.onnx_torch import prepare_graph

    module = convert(prepare_graph(scrfd_path, head_inputs_before(_load_onnx(str(scrfd_path))))).eval()
    with torch.no_grad():
        torch_maps = module(net_input)
    ort_maps = torch_backend.net(net_input)
    for a, b in zip(torch_maps, ort_maps):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4)
    together = detect(torch_backend, batch, 320)
    for i in range(len(batch)):
        alone = detect(torch_backend, batch[i : i + 1], 320)[0]
        np.testing.assert_allclose(together[i].boxes.numpy(), alone.boxes.numpy(), atol=1e-3)


def test_landmarks_agree_with_detector_keypoints(assets, models_dir, scrfd_path):
    bgr = cv2.imread(str(assets / "data" / "images" / "insightface_Tom_Hanks_54745.png"))
    frame = torch.from_numpy(np.ascontiguousarray(bgr[..., ::-1]))[None]
    det = detect(SCRFD(scrfd_path, "cpu"), frame, 320)[0]
    lmk = PFLD68(models_dir / "landmarks68" / "pfld_68.onnx", "cpu")(frame, det.boxes[:1].numpy())[0]
    kps = det.kps[0].numpy()
    iod = np.linalg.norm(kps[0] - kps[1])
    eyes = np.stack([lmk[36:42].mean(0), lmk[42:48].mean(0)])
    assert np.linalg.norm(eyes - kps[:2], axis=1).max() < 0.15 * iod
    assert np.linalg.norm(lmk[30] - kps[2]) < 0.15 * iod
    assert np.linalg.norm(lmk[[48, 54]] - kps[3:], axis=1).max() < 0.15 * iod


def test_best_face_on_device_equals_first_detection_and_its_landmarks(assets, models_dir, scrfd_path):
    """detect_best (no NMS, no host round trip) gives detect's top face; PFLD68.on_device its landmarks."""
    frames = [cv2.imread(str(p))[..., ::-1] for p in sorted((assets / "data" / "deep3d_examples").glob("0000*.jpg"))[:3]]
    size = min(min(f.shape[:2]) for f in frames)
    batch = torch.from_numpy(np.stack([np.ascontiguousarray(f[:size, :size]) for f in frames]))
    blank = torch.zeros_like(batch[:1])
    batch = torch.cat([batch, blank])
    detector = SCRFD(scrfd_path, "cpu")
    listed = detect(detector, batch, 320)
    best = detect_best(detector, batch, 320)
    assert best.found.tolist() == [len(d.scores) > 0 for d in listed] == [True, True, True, False]
    for i in range(3):
        np.testing.assert_allclose(best.boxes[i].numpy(), listed[i].boxes[0].numpy(), atol=1e-4)
        np.testing.assert_allclose(best.kps[i].numpy(), listed[i].kps[0].numpy(), atol=1e-4)
    landmarks = PFLD68(models_dir / "landmarks68" / "pfld_68.onnx", "cpu")
    host = landmarks(batch[:3], best.boxes[:3].numpy())
    device = landmarks.on_device(batch, best.boxes, 1.5 * size)
    np.testing.assert_allclose(device[:3].numpy(), host, atol=1e-3)
    assert torch.isfinite(device[3]).all()  # a frame without a face still gives numbers (masked by found)


def test_flushing_subnormal_weights_keeps_the_landmarks_exactly(assets, models_dir):
    """The PFLD stand-in is mostly subnormal weights (a CPU microcode slow path); flushed, the
    onnxruntime outputs on a real face crop are bit-identical to the original graph's."""
    import onnx

    from avatarcli.onnx_torch import flush_denormal_weights

    path = models_dir / "landmarks68" / "pfld_68.onnx"
    original = onnx.load(str(path))
    flushed = onnx.load(str(path))
    assert flush_denormal_weights(flushed) > 100_000
    assert flush_denormal_weights(flushed) == 0  # idempotent: nothing subnormal is left
    bgr = cv2.imread(str(assets / "data" / "images" / "insightface_Tom_Hanks_54745.png"))
    crop = cv2.resize(bgr[..., ::-1], (112, 112)).astype(np.float32).transpose(2, 0, 1)[None] / 255.0
    outputs = []
    for model in (original, flushed):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {session.get_inputs()[0].name: crop})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
