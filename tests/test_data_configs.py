"""conf/data/*.yaml against the DataModule signatures, and the interface every DataModule shares."""

import inspect
import json
from pathlib import Path

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from genlab.data.datamodule import GenDataModule
from genlab.utils.instantiate import locate

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
NAMES = ["shapes", "digits", "image_folder", "coco", "cifar10", "mnist", "webdataset"]
FILE_DATASETS = {  # what the error of a missing dataset must tell besides the path
    "image_folder": "Expected layout",
    "coco": "Expected layout",
    "cifar10": "download=true",
    "mnist": "download=true",
    "webdataset": "Expected layout",
}


def load(name: str, data_dir: Path):
    """The config ``conf/data/<name>.yaml`` with ``paths.data_dir`` and mandatory values set."""
    data = OmegaConf.load(CONF / f"{name}.yaml")
    if name == "image_folder":  # root: ??? (mandatory)
        data.root = "my_images"
    if name == "webdataset":  # urls: ??? (mandatory)
        data.urls = "shards/train-{000000..000001}.tar"
    return OmegaConf.create({"paths": {"data_dir": str(data_dir)}, "data": data})


@pytest.mark.parametrize("name", NAMES)
def test_config_spells_out_every_argument_with_its_default(name):
    text = (CONF / f"{name}.yaml").read_text()
    assert text.startswith(f"# {name}: ")
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    cls = locate(raw._target_)
    params = inspect.signature(cls.__init__).parameters
    arguments = {k: p for k, p in params.items() if k != "self"}
    assert set(raw.keys()) - {"_target_"} == set(arguments)
    for key, param in arguments.items():
        assert param.kind is param.KEYWORD_ONLY and param.default is not param.empty, key
        assert param.annotation is not param.empty, key
        if key == "data_dir":
            assert OmegaConf.to_container(raw, resolve=False)[key] == "${paths.data_dir}"
        elif not OmegaConf.is_missing(raw, key):
            value = OmegaConf.to_container(raw, resolve=False)[key]
            default = list(param.default) if isinstance(param.default, tuple) else param.default
            assert value == default, key


@pytest.mark.parametrize("name", NAMES)
def test_config_instantiates_with_the_common_interface(name, tmp_path):
    dm = instantiate(load(name, tmp_path).data)
    assert isinstance(dm, GenDataModule)
    assert dm.data_dir == tmp_path and dm.batch_size == 64
    assert dm.channels in (1, 3) and dm.resolution in (32, 64)
    assert dm.num_classes is None or len(dm.class_names) == dm.num_classes
    description = dm.describe()
    assert json.loads(json.dumps(description)) == description and description["dataset"] == name


@pytest.mark.parametrize("name", sorted(FILE_DATASETS))
def test_missing_dataset_fails_at_setup_naming_path_and_layout(name, tmp_path):
    dm = instantiate(load(name, tmp_path).data)  # construction does not look at the disk
    with pytest.raises(FileNotFoundError) as error:
        dm.setup("fit")
    message = str(error.value)
    assert str(tmp_path) in message and FILE_DATASETS[name] in message


def test_embedded_datasets_need_no_files(tmp_path):
    for name in ("shapes", "digits"):
        dm = instantiate(load(name, tmp_path / "absent").data)
        dm.setup("fit")
        assert len(dm.data_train) > 0 and dm.sample_prompts(2) and dm.train_captions()
