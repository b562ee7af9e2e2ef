"""Work split over ranks comes back whole and in order; alone, it is a plain call."""

from pathlib import Path

import pytest

from oloraplus.distributed import ALONE, Ranks, interleave

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n, world", [(7, 2), (6, 3), (1, 2), (0, 2), (5, 8)])
def test_shares_cover_every_item_once_and_interleave_restores_the_order(n, world):
    items = list(range(10, 10 + n))
    parts = [Ranks(rank, world).share(items) for rank in range(world)]
    assert sorted(x for part in parts for x in part) == items
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert interleave(parts) == items


def test_a_single_process_maps_the_whole_list_and_keeps_its_own_value():
    seen = []

    def work(share):
        seen.append(list(share))
        return [x * x for x in share]

    assert ALONE.is_main and ALONE.map_shared(work, [3, 1, 2]) == [9, 1, 4]
    assert seen == [[3, 1, 2]]
    assert ALONE.from_main("verdict") == "verdict"


def test_work_must_give_one_result_per_item():
    with pytest.raises(ValueError, match="2 results for 3 items"):
        ALONE.map_shared(lambda share: share[:2], [1, 2, 3])


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_the_accelerate_configs_load_as_accelerate_reads_them(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "examples" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type == kind and config.num_processes == 2
    assert config.mixed_precision == "no"  # --precision decides, as on one process
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # the only FSDP whose shards oloraplus gathers
