"""Expert popularity (basestation/popularity.py): counts by hand, the file, bad files refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
from waiting import wait_until

from basestation.popularity import (
    Popularity,
    PopularityError,
    PopularityWriter,
    load_popularity,
    out_path_error,
)


def test_decode_rows_and_a_batch_tensor_count_by_hand():
    pop = Popularity(4)
    decode = torch.tensor([[1, 3]])
    pop.add(0, decode, decode.tolist())  # a decode step: the caller's rows
    pop.add(0, decode, decode.tolist())
    batch = torch.tensor([[0, 1], [1, 2], [3, 1]])  # a prefill: one bincount
    pop.add(0, batch, None)
    pop.add(1, batch, None)
    assert pop.snapshot() == {0: [1, 5, 1, 3], 1: [1, 3, 1, 1]}
    assert pop.totals() == [2, 8, 2, 4]
    assert pop.slots == 16  # (1 + 1 + 3) tokens x 2 at layer 0, 3 x 2 at layer 1
    assert pop.tokens == 5  # the most rows one layer saw


def test_the_file_round_trips(tmp_path):
    pop = Popularity(3)
    pop.add(2, torch.tensor([[0, 2], [2, 1]]), None)
    pop.add(5, torch.tensor([[1, 0]]), [[1, 0]])
    path = str(tmp_path / "pop.json")
    pop.save(path)
    data = json.loads(open(path).read())
    assert data == {"version": 1, "num_experts": 3, "tokens": 2,
                    "layers": {"2": [1, 1, 2], "5": [1, 1, 0]}, "slots": 6}
    back = load_popularity(path)
    assert back.snapshot() == pop.snapshot() and back.tokens == 2 and back.num_experts == 3
    assert [n for n in os.listdir(tmp_path)] == ["pop.json"]  # no staged file left


GOOD = {"version": 1, "num_experts": 2, "tokens": 1, "layers": {"0": [1, 1]}, "slots": 2}


@pytest.mark.parametrize("content, says", [
    (b"not json {", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (json.dumps([1, 2]).encode(), "not a version 1 popularity file"),
    (json.dumps(GOOD | {"version": 2}).encode(), "not a version 1 popularity file (version 2)"),
    (json.dumps(GOOD | {"num_experts": 0}).encode(), "num_experts must be an integer >= 1"),
    (json.dumps(GOOD | {"layers": [[1, 1]]}).encode(), "layers must be an object"),
    (json.dumps(GOOD | {"layers": {"x": [1, 1]}}).encode(), "layer 'x' is not a layer index"),
    (json.dumps(GOOD | {"layers": {"0": [1, 1, 0]}}).encode(), "layer 0 needs 2 counts"),
    (json.dumps(GOOD | {"layers": {"0": [3, -1]}}).encode(), "counts must be integers >= 0"),
    (json.dumps(GOOD | {"layers": {"0": [1.5, 0]}}).encode(), "counts must be integers >= 0"),
    (json.dumps(GOOD | {"layers": {"0": [True, 1]}}).encode(), "counts must be integers >= 0"),
    (json.dumps(GOOD | {"slots": 7}).encode(), "slots 7 is not the sum of the counts (2)"),
    (json.dumps(GOOD | {"tokens": -1}).encode(), "tokens must be an integer >= 0"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, content, says):
    path = tmp_path / "pop.json"
    path.write_bytes(content)
    with pytest.raises(PopularityError) as e:
        load_popularity(str(path))
    assert says in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(str(path))


def test_a_missing_file_is_one_line(tmp_path):
    with pytest.raises(PopularityError, match="No such file"):
        load_popularity(str(tmp_path / "none.json"))


def test_out_path_checked_before_a_run(tmp_path):
    assert out_path_error(str(tmp_path / "pop.json")) is None
    assert "no such folder" in out_path_error(str(tmp_path / "nope" / "pop.json"))
    assert "is a folder" in out_path_error(str(tmp_path))


def test_the_writer_saves_periodically_and_at_close(tmp_path):
    pop = Popularity(2)
    path = str(tmp_path / "pop.json")
    writer = PopularityWriter(pop, path, interval_s=0.05).start()
    try:
        pop.add(0, torch.tensor([[0, 1]]), None)
        wait_until(lambda: os.path.exists(path) and load_popularity(path).slots == 2,
                   timeout_s=10, interval_s=0.02, what="a periodic write")
        pop.add(0, torch.tensor([[1, 1]]), None)
    finally:
        writer.close()
    assert load_popularity(path).snapshot() == {0: [1, 3]}
