"""The radio energy model (metering.radio) on hand-computed cases."""

import pytest

from metering.radio import RADIOS, radio_energy, radio_model

LTE = RADIOS["lte"]


def test_one_upload_costs_data_base_one_promotion_and_one_full_tail():
    e = radio_energy([(0.0, 1_000_000, 0)], LTE, up_mbit_s=10.0, down_mbit_s=30.0)
    assert e.data_j == pytest.approx(0.43839 * 8)  # αu x 8 Mbit
    assert e.active_s == pytest.approx(0.8)  # 8 Mbit at 10 Mbit/s
    assert e.base_j == pytest.approx(1.28804 * 0.8)
    assert e.promotions == 1
    assert e.promotion_j == pytest.approx(1.2107 * 0.2601)
    assert e.tail_j == pytest.approx(1.060 * 11.576)
    assert e.total_j == pytest.approx(e.data_j + e.base_j + e.promotion_j + e.tail_j)


def test_a_gap_shorter_than_the_tail_keeps_the_radio_connected():
    e = radio_energy([(0.0, 0, 0), (5.0, 0, 0)], LTE, 10.0, 30.0)
    assert e.promotions == 1
    assert e.tail_j == pytest.approx(1.060 * (5.0 + 11.576))


def test_a_gap_longer_than_the_tail_pays_a_full_tail_and_a_new_promotion():
    e = radio_energy([(0.0, 0, 0), (100.0, 0, 0)], LTE, 10.0, 30.0)
    assert e.promotions == 2
    assert e.tail_j == pytest.approx(2 * 1.060 * 11.576)


def test_overlapping_transfers_merge_into_one_active_period():
    # 1.25 MB down at 10 Mbit/s lasts 1 s; the second starts inside it and ends at 1.5 s.
    e = radio_energy([(0.0, 0, 1_250_000), (0.5, 0, 1_250_000)], LTE, 10.0, 10.0)
    assert e.active_s == pytest.approx(1.5)
    assert e.promotions == 1
    assert e.data_j == pytest.approx(0.05197 * 20)


def test_wifi_tail_is_short_so_sparse_offloads_cost_little():
    sparse = [(float(t), 1000, 100) for t in range(0, 100, 10)]  # one offload every 10 s
    wifi = radio_energy(sparse, RADIOS["wifi"], 50.0, 50.0)
    lte = radio_energy(sparse, LTE, 10.0, 30.0)
    assert wifi.promotions == 10 and lte.promotions == 1
    assert wifi.total_j < lte.total_j / 20


def test_names():
    assert radio_model("none") is None and radio_model(None) is None
    assert radio_model("lte") is LTE
    with pytest.raises(ValueError, match="known: none, lte, wifi"):
        radio_model("5g")
    with pytest.raises(ValueError, match="positive"):
        radio_energy([(0.0, 1, 1)], LTE, 0.0, 1.0)
