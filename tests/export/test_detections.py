"""utils/detections.py: targets from probability maps, the streaming table, masks, annotated frames, Detector."""
from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from model import DCONet, DCONetConfig, StageOutput, to_release_state_dict
from utils.export.detection_table import TABLE_COLUMNS, DetectionTable, read_table, table_rows
from utils.export.detections import (DETECTOR_INPUT, Detection, Detector, detect, detect_logits, detection_label, draw_detections, mask_image,
                              probability_from_logits, to_image_pixels, write_mask)
from utils.export.predict import Geometry, predict, prepare_model
from utils.score.components import components
from utils.io.images import resize_linear
from utils.score.metrics import score_map


def hand_made_map() -> np.ndarray:
    """Three targets on a 10x12 map of zeros: a 2x3 block with one brighter pixel, two diagonal neighbours (one
    target under 8-connectivity, two under 4-connectivity) and one pixel in the bottom-right corner."""
    p = np.zeros((10, 12), np.float32)
    p[1:3, 2:5] = 0.8
    p[1, 2] = 0.9
    p[5, 5], p[6, 6] = 0.7, 0.6
    p[9, 11] = 0.51
    return p


def test_detect_hand_made_map():
    found = detect(hand_made_map())
    assert [d.id for d in found] == [1, 2, 3]
    block, diagonal, corner = found
    assert (block.x, block.y) == pytest.approx((3.0, 1.5))          # mean column, mean row
    assert block.box == (2, 1, 5, 3) and block.area == 6              # columns 2..4, rows 1..2: exclusive ends
    assert block.peak == pytest.approx(0.9) and block.mean == pytest.approx((0.9 + 5 * 0.8) / 6)
    assert diagonal.area == 2 and diagonal.box == (5, 5, 7, 7), "diagonal pixels are one 8-connected target"
    assert diagonal.centroid == pytest.approx((5.5, 5.5)) and diagonal.peak == pytest.approx(0.7)
    assert corner.box == (11, 9, 12, 10) and corner.area == 1 and corner.mean == pytest.approx(0.51)
    assert all(d.threshold == 0.5 for d in found)


def test_detect_uses_the_metrics_components_and_their_order():
    rng = np.random.default_rng(3)
    p = (rng.random((40, 50)) ** 6).astype(np.float32)               # scattered bright pixels, many touching
    found = detect(p, threshold=0.3)
    reference = components(p > 0.3)
    assert len(found) == reference.n > 10
    np.testing.assert_allclose([d.area for d in found], reference.area)
    np.testing.assert_allclose([(d.y, d.x) for d in found], reference.centroid)
    for d in found:                                                   # box and scores from the label map
        inside = reference.labels == d.id
        rows, cols = np.nonzero(inside)
        assert d.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert d.peak == pytest.approx(p[inside].max()) and d.mean == pytest.approx(p[inside].mean())


def test_threshold_is_strict_on_the_probability():
    p = hand_made_map()
    assert [d.area for d in detect(p, threshold=0.8)] == [1], "only the 0.9 pixel lies strictly above 0.8"
    assert len(detect(p, threshold=0.51)) == 2, "a pixel equal to the threshold is not a target"
    assert len(detect(p, threshold=0.0)) == 3
    assert detect(p, threshold=1.0) == []
    assert [d.area for d in detect(p, threshold=0.65)] == [6, 1]     # the diagonal pair loses its 0.6 pixel
    with pytest.raises(ValueError, match="threshold"):
        detect(p, threshold=1.5)


def test_empty_map_and_min_area():
    assert detect(np.zeros((8, 8), np.float32)) == []
    kept = detect(hand_made_map(), min_area=2)
    assert [(d.id, d.area) for d in kept] == [(1, 6), (2, 2)], "ids are renumbered 1..m after filtering"


def test_logits_are_refused_and_detect_logits_matches_the_standard_protocol():
    rng = np.random.default_rng(0)
    T = rng.normal(-3.0, 3.0, (32, 32)).astype(np.float32)
    with pytest.raises(ValueError, match="logits"):
        detect(T)
    found = detect_logits(T)
    standard = components(score_map(T, "sigmoid") > 0.5)             # the standard protocol's predicted targets
    assert len(found) == standard.n > 0
    np.testing.assert_allclose([(d.y, d.x) for d in found], standard.centroid)
    assert detect(probability_from_logits(T)) == found
    assert all(d.peak > 0.5 for d in found)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        detect(np.zeros((1, 1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        detect(np.full((4, 4), np.nan, np.float32))


def test_table_csv_and_jsonl_round_trip(tmp_path):
    found = detect(hand_made_map())
    for suffix in (".csv", ".jsonl"):
        path = tmp_path / "runs" / f"detections{suffix}"                 # the folder is created
        with DetectionTable(path) as table:
            assert table.write(found, source="clip, 1.avi", frame=7, time=0.28) == 3
            assert table.write([], source="clip, 1.avi", frame=8, time=0.32) == 0
            table.write(found[:1], source="still.png")
            assert table.rows == 4
        expected = table_rows(found, "clip, 1.avi", 7, 0.28) + table_rows(found[:1], "still.png")
        assert read_table(path) == expected
    csv_lines = (tmp_path / "runs" / "detections.csv").read_text().splitlines()
    assert csv_lines[0] == ",".join(TABLE_COLUMNS)
    assert csv_lines[1] == '"clip, 1.avi",7,0.280000,1,3.000,1.500,2,1,5,3,6,0.900000,0.816667,0.500000'
    assert csv_lines[4] == "still.png,,,1,3.000,1.500,2,1,5,3,6,0.900000,0.816667,0.500000"
    records = [json.loads(line) for line in (tmp_path / "runs" / "detections.jsonl").read_text().splitlines()]
    assert records[0] == {"source": "clip, 1.avi", "frame": 7, "time_s": 0.28, "id": 1, "x": 3.0, "y": 1.5, "x0": 2,
                          "y0": 1, "x1": 5, "y1": 3, "area": 6, "peak": 0.9, "mean": 0.816667, "threshold": 0.5}
    assert records[3]["frame"] is None and records[3]["time_s"] is None


def test_table_rows_are_on_disk_before_closing(tmp_path):
    path = tmp_path / "live.csv"
    table = DetectionTable(path)
    table.write(detect(hand_made_map()), source="a.png")
    assert len(read_table(path)) == 3, "rows are flushed as they are written"
    table.close()
    with pytest.raises(ValueError, match="closed"):
        table.write([], source="b.png")


def test_table_never_overwrites_silently(tmp_path):
    path = tmp_path / "detections.csv"
    path.write_text("someone's notes\n")
    with pytest.raises(FileExistsError, match="detections.csv"):
        DetectionTable(path)
    assert path.read_text() == "someone's notes\n"
    with DetectionTable(path, overwrite=True) as table:
        table.write(detect(hand_made_map()), source="a.png")
    assert len(read_table(path)) == 3
    with pytest.raises(ValueError, match=r"\.csv or a \.jsonl"):
        DetectionTable(tmp_path / "detections.json")


def test_mask_png(tmp_path):
    p = hand_made_map()
    path = write_mask(tmp_path / "masks" / "a.png", p)
    written = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert written.dtype == np.uint8 and written.shape == p.shape
    assert set(np.unique(written)) == {0, 255}
    np.testing.assert_array_equal(written == 255, p > 0.5)
    np.testing.assert_array_equal(mask_image(p, 0.75) == 255, p > 0.75)
    with pytest.raises(FileExistsError, match="a.png"):
        write_mask(path, p)


def test_draw_detections_boxes_labels_and_input_untouched():
    image = np.full((40, 48), 0.2, np.float32)
    image[20:23, 10:14] = 0.9
    probability = np.where(image > 0.5, 0.95, 0.0).astype(np.float32)
    found = detect(probability)
    before = image.copy()
    drawn = draw_detections(image, found, color=(0, 0, 255))
    np.testing.assert_array_equal(image, before)
    assert drawn.dtype == np.uint8 and drawn.shape == (40, 48, 3)
    red = (drawn[..., 2] == 255) & (drawn[..., 0] == 0) & (drawn[..., 1] == 0)
    # box one pixel outside the component (rows 20..22, columns 10..13): rows 18 and 24, columns 8 and 15
    assert red[18, 8:16].all() and red[24, 8:16].all() and red[18:25, 8].all() and red[18:25, 15].all()
    assert (drawn[20:23, 10:14] == 230).all(), "the target's own pixels stay visible"
    above = drawn[:17].astype(int)      # anti-aliased text: its pixels lean red, few are pure red
    assert (above[..., 2] > above[..., 1] + 50).any(), "the label is written above the box"
    big = draw_detections(image, found, scale=3, show_score=False)
    assert big.shape == (120, 144, 3)
    assert (draw_detections(image, []) == np.round(image * 255).astype(np.uint8)[..., None]).all()


class Threshold(torch.nn.Module):
    """A stand-in with DCONet's call signature whose T is 50 * (x - 0.5): target pixels are x > 0.5. (The gain is
    a buffer: inference finds a model's device by its first tensor.)"""

    def __init__(self):
        super().__init__()
        self.register_buffer("gain", torch.tensor(50.0))

    def forward(self, x, return_stages=False):
        T = self.gain * (x - 0.5)
        return (x, T, [StageOutput(torch.zeros_like(x), T, x)]) if return_stages else (x, T)


def test_detector_weights_in_image_in_probability_and_targets_out(tmp_path):
    torch.manual_seed(0)
    model = DCONet(DCONetConfig(stage_num=1))
    weights = tmp_path / "best.pkl"
    torch.save(to_release_state_dict(model), weights)
    image = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    net = prepare_model(model, "cpu")
    # a release best.pkl runs at 256x256, as t_models.py runs it; map and targets come back in the image's pixels
    probability, found = Detector(weights, device="cpu")(image)
    on_map = probability_from_logits(predict(net, image, Geometry(resize=256)).T)
    assert probability.shape == (64, 64) and probability.dtype == np.float32
    np.testing.assert_allclose(probability, np.clip(resize_linear(on_map, (64, 64)), 0, 1), atol=1e-6)
    assert found == to_image_pixels(detect(on_map), (256, 256), (64, 64))
    probability, found = Detector(weights, device="cpu", geometry=Geometry())(image)      # native size
    np.testing.assert_allclose(probability, probability_from_logits(predict(net, image).T), atol=1e-6)
    assert found == detect(probability)

    stand_in = Detector(Threshold(), device="cpu", plain=True, geometry=Geometry(resize=64))
    image = np.zeros((48, 80), np.float32)
    image[20:24, 30:36] = 1.0
    probability, found = stand_in(image)
    assert probability.shape == (48, 80), "resize mode: the map comes back at the image's size"
    assert len(found) == 1 and abs(found[0].x - 32.5) < 0.6 and abs(found[0].y - 21.5) < 0.6
    assert isinstance(found[0], Detection)


@pytest.mark.parametrize("image, words", [
    (np.full((48, 80), 40.0, np.float32), ["values in [40, 40]", "divide by 255, or pass them as uint8"]),
    (np.full((48, 80), 4000.0), ["values in [4000, 4000]", "divide by 65535, or pass them as uint16"]),
    (np.full((48, 80), -1.0, np.float32), ["values in [-1, -1]", "scale them to [0, 1]"]),
    (np.full((48, 80), np.nan, np.float32), ["NaN or infinite"]),
    (np.zeros((48, 80, 3), np.float32), ["got float32 (48, 80, 3), a float colour image", "cv2.COLOR_BGR2GRAY"]),
    (np.zeros((2, 48, 80), np.uint8), ["got uint8 (2, 48, 80)", "one image at a time"]),
    (np.zeros((48, 80), np.int32), ["got int32 (48, 80)", "image.astype(np.uint8)"]),
])
def test_detector_refuses_input_it_would_misread(image, words):
    """A float image in 0..255 once gave three targets (two of them corners) instead of one; every input the
    Detector would misread is refused with what it expects and how to convert."""
    detector = Detector(Threshold(), device="cpu", plain=True, geometry=Geometry(resize=64))
    with pytest.raises(ValueError) as info:
        detector(image)
    message = str(info.value)
    assert message.startswith(f"Detector expects {DETECTOR_INPUT}; got ")
    for word in words:
        assert word in message, message


def test_detector_takes_uint8_uint16_and_unit_float_alike():
    detector = Detector(Threshold(), device="cpu", plain=True, geometry=Geometry(resize=64))
    unit = np.zeros((48, 80), np.float32)
    unit[20:24, 30:36] = 1.0
    for image in (unit, (unit * 255).astype(np.uint8), (unit * 65535).astype(np.uint16)):
        probability, found = detector(image)
        assert len(found) == 1 and abs(found[0].x - 32.5) < 0.6, image.dtype


def test_a_drawn_label_keeps_id_and_score_apart():
    """"1 1.00" read as "11.00" on annotated frames."""
    found = Detection(id=1, x=5.0, y=5.0, x0=4, y0=4, x1=7, y1=7, area=9, peak=1.0, mean=0.9,
                      threshold=0.5)
    assert detection_label(found) == "#1: 1.00" and detection_label(found, show_score=False) == "#1"
