import pytest

from vlm_interp.errors import SiteError
from vlm_interp.sites import Site, parse_site


@pytest.mark.parametrize(
    "name, site",
    [
        ("lm.attn.12", Site("lm", "attn", 12)),
        ("lm.hidden.-1", Site("lm", "hidden", -1)),
        ("vision.mlp.0", Site("vision", "mlp", 0)),
        ("lm.head.12.5", Site("lm", "head", 12, 5)),
        ("qformer.xattn.3", Site("qformer", "xattn", 3)),
        ("qformer.xattn.3.head.7", Site("qformer", "xattn_head", 3, 7)),
        ("text.xattn.7.head.0", Site("text", "xattn_head", 7, 0)),
    ],
)
def test_parse_and_format_round_trip(name, site):
    assert parse_site(name) == site
    assert parse_site(name).name == name


@pytest.mark.parametrize(
    "bad, words",
    [
        ("lm.attn", "too short"),
        ("brain.attn.1", "unknown tower"),
        ("lm.ffn.1", "malformed"),
        ("lm.attn.x", "integer"),
        ("lm.head.3", "malformed"),
        ("lm.attn.1.2", "malformed"),
        ("qformer.xattn.1.heads.2", "malformed"),
    ],
)
def test_bad_site_names_say_what_is_wrong(bad, words):
    with pytest.raises(SiteError, match=words):
        parse_site(bad)


def test_head_component_needs_head_index():
    with pytest.raises(SiteError, match="needs a head"):
        Site("lm", "head", 1)
    with pytest.raises(SiteError, match="takes no head"):
        Site("lm", "attn", 1, 2)
