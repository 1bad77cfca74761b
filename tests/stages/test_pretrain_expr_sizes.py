"""pretrain-expr's sizes by device: --width, --image-size, --negatives and --batch-clips left unset
are Export3D's on CUDA and CPU-sized on a CPU; set ones are kept; the result hash sees the values used."""

from stages.pretrain_expr import SIZES, PretrainExprConfig


def sizes(config: PretrainExprConfig) -> tuple:
    return config.width, config.image_size, config.negatives, config.batch_clips


def test_unset_sizes_follow_the_device_and_set_ones_are_kept():
    config = PretrainExprConfig()
    assert config.auto_sized() == ["width", "image_size", "negatives", "batch_clips"]
    assert sizes(config.sized_for(cuda=True)) == (64, 112, 32, 32)
    assert sizes(config.sized_for(cuda=False)) == (16, 64, 15, 16)
    assert sizes(config) == (None, None, None, None)  # the config itself is not changed
    mine = PretrainExprConfig(width=64, negatives=7)
    assert mine.auto_sized() == ["image_size", "batch_clips"]
    assert sizes(mine.sized_for(cuda=False)) == (64, 64, 7, 16)
    assert sizes(PretrainExprConfig(batch_clips=5).sized_for(cuda=False, world_size=2)) == (16, 64, 15, 5)
    assert PretrainExprConfig().sized_for(cuda=False, world_size=3).batch_clips == 18  # a multiple of the processes


def test_the_result_hash_is_of_the_sizes_used():
    cpu, cuda = PretrainExprConfig().sized_for(cuda=False), PretrainExprConfig().sized_for(cuda=True)
    assert cpu.result_hash() != cuda.result_hash()
    assert cpu.result_hash() == PretrainExprConfig(**SIZES["cpu"]).result_hash()  # as if given on the command line
    assert cpu.to_json()["width"] == 16


def test_an_unresolved_width_builds_the_published_model_shape():
    assert PretrainExprConfig().shape(expr_dim=53).width == SIZES["cuda"]["width"] == 64
