"""RunConfig: validation with clear errors, the run id, and TOML / YAML files."""

import pytest

from comparison.config import DEFAULT_METHODS, ConfigError, RunConfig, load_config_file
from comparison.methods import available_methods


def test_defaults_are_valid_and_name_every_method():
    config = RunConfig()
    # every method but the variants and dynamic sparse training (named with --methods: they train
    # for the whole pretraining too, which the default run's time budget leaves out)
    assert set(config.methods) == {name for name, cls in available_methods().items()
                                   if cls.variant_of is None and not cls.from_scratch}
    assert config.methods == DEFAULT_METHODS
    assert config.dataset == "digits" and config.scope == "all"
    assert config.sparsities == (0.9, 0.95, 0.98) and config.lr == 1e-3
    assert (config.pretrain_epochs, config.steps, config.epochs_per_step, config.bn_recalibration_batches) == (6, 5, 2, 8)


def test_run_id_ignores_grid_axes_and_locations_but_not_settings():
    base = RunConfig(width=0.125)
    same = base.replace(seeds=(0, 1, 2), sparsities=(0.5,), methods=("nni",), out="/tmp/x", data_dir="/d")
    assert same.run_id == base.run_id
    for change in ({"width": 0.25}, {"steps": 4}, {"lr": 0.01}, {"scope": "classifier"}, {"limit_test": 10},
                   {"bn_recalibration_batches": 0}):
        assert base.replace(**change).run_id != base.run_id, change


def test_baseline_id_depends_only_on_what_trains_the_baseline():
    base = RunConfig(width=0.125)
    assert base.replace(steps=7, scope="all", epochs_per_step=3).baseline_id() == base.baseline_id()
    assert base.replace(pretrain_epochs=9).baseline_id() != base.baseline_id()


def test_default_out_dir_contains_dataset_and_run_id():
    config = RunConfig()
    assert config.out_dir.name == f"digits-{config.run_id}"
    assert str(config.replace(out="somewhere").out_dir) == "somewhere"


@pytest.mark.parametrize(
    "changes, words",
    [
        ({"methods": ("dense", "magic")}, ["magic", "actuallysparse", "nni", "torch-prune"]),
        ({"dataset": "mnist"}, ["mnist", "digits", "cifar10", "cifar100"]),
        ({"scope": "convs"}, ["convs", "classifier", "all"]),
        ({"device": "tpu"}, ["tpu", "cpu", "cuda"]),
        ({"sparsities": (0.9, 1.0)}, ["1.0", "(0, 1)"]),
        ({"sparsities": (0.9, 0.9)}, ["duplicates"]),
        ({"steps": 0}, ["steps", ">= 1"]),
        ({"width": -1.0}, ["width", "-1.0"]),
        ({"seeds": ()}, ["seeds"]),
    ],
)
def test_invalid_values_name_what_was_given_and_what_is_valid(changes, words):
    with pytest.raises(ConfigError) as error:
        RunConfig(**changes)
    for word in words:
        assert word in str(error.value)


def test_from_mapping_accepts_dashes_and_comma_strings():
    config = RunConfig.from_mapping({"epochs-per-step": "2", "sparsities": "0.5, 0.75", "seeds": "3,4",
                                     "methods": "nni,dense", "limit_train": "none"})
    assert config.epochs_per_step == 2
    assert config.sparsities == (0.5, 0.75)
    assert config.seeds == (3, 4)
    assert config.methods == ("nni", "dense")
    assert config.limit_train is None


def test_from_mapping_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ConfigError, match="unknown config key 'widht'.*width"):
        RunConfig.from_mapping({"widht": 1})


def test_from_mapping_rejects_unparsable_numbers():
    with pytest.raises(ConfigError, match="invalid value 'abc' for width"):
        RunConfig.from_mapping({"width": "abc"})


def test_toml_and_yaml_files_give_the_same_config(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('dataset = "digits"\nwidth = 0.25\nsparsities = [0.5, 0.9]\nseeds = [1]\n'
                    'methods = ["dense", "nni"]\nepochs-per-step = 2\n')
    yaml = tmp_path / "run.yaml"
    yaml.write_text("dataset: digits\nwidth: 0.25\nsparsities: [0.5, 0.9]\nseeds: [1]\n"
                    "methods: [dense, nni]\nepochs_per_step: 2\n")
    from_toml, from_yaml = load_config_file(toml), load_config_file(yaml)
    assert from_toml == from_yaml
    assert from_toml.width == 0.25 and from_toml.sparsities == (0.5, 0.9) and from_toml.epochs_per_step == 2


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.toml")
    ini = tmp_path / "run.ini"
    ini.write_text("width = 1")
    with pytest.raises(ConfigError, match=r"\.toml, \.yaml or \.yml"):
        load_config_file(ini)
    broken = tmp_path / "broken.toml"
    broken.write_text("width = = 1")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config_file(broken)


def test_describe_lists_every_field():
    text = RunConfig(width=0.5).describe()
    assert RunConfig().run_id not in text  # width changed the id
    for name in ("dataset", "width", "sparsities", "epochs_per_step"):
        assert name in text
