"""The architecture names a request is checked against, without timm, are exactly the installed timm's."""

import pytest
import timm

from trainer import architectures


def test_the_shipped_list_is_the_installed_timms():
    assert architectures.known() == frozenset(timm.list_models()), (
        "trainer/architectures.txt is stale: regenerate it (see trainer/architectures.py)"
    )


def test_an_unknown_name_names_close_ones():
    assert architectures.check("resnet18") == "resnet18"
    with pytest.raises(ValueError, match=r"unknown architecture 'resnet181'; timm has for example \['resnet18"):
        architectures.check("resnet181")
