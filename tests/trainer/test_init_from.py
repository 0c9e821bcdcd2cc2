"""A run may start from a model folder's weights (``init_from``) of its own architecture and classes."""

import pytest
import torch

from curation.errors import UserError
from tests.helpers import untrained_model
from trainer import loop, models, train
from trainer.config import TrainConfig
from trainer.meta import ModelMeta


def test_a_run_starts_from_the_folder_s_weights(tmp_path):
    start = untrained_model(str(tmp_path / "start"))
    config = TrainConfig(architecture="test_resnet", input_size=32, init_from=str(tmp_path / "start"))
    train.check_init_from(config, start.class_names)
    meta = ModelMeta(architecture="test_resnet", input_size=32, class_names=start.class_names)
    state = loop._State(config, meta, torch.device("cpu"))
    saved = models.load(str(tmp_path / "start"))[0].state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in state.model.state_dict().items())
    fresh = loop._State(config.model_copy(update={"init_from": None}), meta, torch.device("cpu"))
    assert not all(torch.equal(v, saved[k]) for k, v in fresh.model.state_dict().items() if v.is_floating_point())


def test_a_folder_of_another_architecture_or_classes_is_a_user_error(tmp_path):
    untrained_model(str(tmp_path / "start"), classes=3)
    config = TrainConfig(architecture="test_resnet", input_size=32, init_from=str(tmp_path / "start"))
    with pytest.raises(UserError, match="is a test_resnet of 3 classes; the run trains a test_resnet of 10"):
        train.check_init_from(config, [str(c) for c in range(10)])
    with pytest.raises(UserError, match="not a model folder"):
        train.check_init_from(config.model_copy(update={"init_from": str(tmp_path)}), ["0", "1", "2"])
