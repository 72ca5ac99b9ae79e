import pytest
import yaml

from jobs.spec import apply_overrides, load_spec, parse_spec
from pipeline.errors import SpecError
from tests.archive import patched

BASE = {
    "inputs": {"url": "/data/in"},
    "model": {"classes": [{"name": "a"}, {"name": "b"}]},
    "output": {"url": "/data/out"},
}


def _with(**patch):
    return patched(BASE, **patch)


def test_minimal_spec_fills_defaults():
    spec = parse_spec(BASE)
    assert spec.tiling.tile == 512 and spec.tiling.blend == "gaussian"
    assert spec.output.if_exists == "resume" and spec.failure.mode == "continue"
    assert spec.cluster.address is None


def test_unknown_key_is_rejected_with_its_full_path():
    with pytest.raises(SpecError) as e:
        parse_spec(_with(tiling__overlapp=3))
    assert e.value.problems == ["tiling.overlapp: unknown key (check its spelling and place)"]


@pytest.mark.parametrize(
    "patch, field",
    [
        (dict(tiling__overlap=600), "tiling"),
        (dict(tiling__tile=16), "tiling.tile"),
        (dict(tiling__blend="box"), "tiling.blend"),
        (dict(model__name="unet9000"), "model.name"),
        (dict(resources__workers=0), "resources.workers"),
        (dict(output__if_exists="append"), "output.if_exists"),
        (dict(inputs__value_range=[5, 1]), "inputs.value_range"),
        (dict(inputs__bands=[2, -1]), "inputs.bands.1"),
        (dict(inputs__bands=[2, 1], inputs__value_range=[[0, 9], [5, 1]]), "inputs.value_range"),
        (dict(inputs__value_range=[[0, 9], [0, 5]]), "inputs: value_range gives 2 [low, high] pairs, one per band"),
        (dict(inputs__bands=[4], inputs__value_range=[[0, 9], [0, 5]]), "inputs: value_range gives 2 [low, high] "
                                                                         "pairs for 1 bands"),
        (dict(inputs__bands=[4, 5], inputs__preview_bands=[0, 1, 2]), "inputs: preview_bands [0, 1, 2] must be"),
        (dict(model__classes=None), "model"),
    ],
)
def test_bad_values_name_the_field(patch, field):
    with pytest.raises(SpecError) as e:
        parse_spec(_with(**patch))
    assert any(p.startswith(field) for p in e.value.problems), e.value.problems


def test_unknown_model_lists_valid_names():
    with pytest.raises(SpecError) as e:
        parse_spec(_with(model__name="unet9000"))
    assert "fpn_resnet18" in e.value.problems[0]


@pytest.mark.parametrize("key", ["key", "secret", "aws_secret_access_key", "token"])
def test_credentials_in_storage_options_are_refused(key):
    with pytest.raises(SpecError) as e:
        parse_spec(_with(inputs__storage_options={"endpoint_url": "http://x", key: "hunter2"}))
    msg = " ".join(e.value.problems)
    assert "credential" in msg and "hunter2" not in msg


def test_spec_is_frozen():
    spec = parse_spec(BASE)
    with pytest.raises(Exception):
        spec.tiling.tile = 256


def test_overrides_and_file_loading(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(BASE))
    spec = load_spec(path, ["resources.workers=4", "tiling.blend=cosine", "output.extras=[confidence]"])
    assert spec.resources.workers == 4 and spec.tiling.blend == "cosine"
    assert spec.output.extras == ["confidence"]
    with pytest.raises(SpecError, match="expected key.path=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(SpecError, match="file not found"):
        load_spec(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("inputs: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(tmp_path / "bad.yaml")


def test_echo_round_trips():
    spec = parse_spec(_with(inputs__storage_options={"endpoint_url": "http://127.0.0.1:9"}))
    assert parse_spec(yaml.safe_load(spec.echo())) == spec


def test_model_name_defaults_to_the_checkpoint(tmp_path):
    from jobs.runner import resolve_model
    from models.checkpoint import seeded_checkpoint

    path = tmp_path / "unet.safetensors"
    path.write_bytes(seeded_checkpoint("unet_resnet10", 2, ["a", "b"], width=8))
    spec = parse_spec(_with(model={"checkpoint": str(path)}))
    assert spec.model.name is None and resolve_model(spec).class_names == ("a", "b")
    wrong = parse_spec(_with(model={"checkpoint": str(path), "name": "fpn_resnet18"}))
    with pytest.raises(SpecError, match="set model.name: unet_resnet10"):
        resolve_model(wrong)
    assert parse_spec(BASE).model.architecture == "fpn_resnet18"


def test_the_tile_is_checked_against_the_network_stride():
    """A tile must be a multiple of the model's size multiple: 32 for gigaseg's ResNet heads; any size for the
    reference architectures, which resample by size (MagNet's 612 px patches)."""
    from jobs.plan import resolve_model

    with pytest.raises(SpecError, match=r"tiling.tile: 500 is not a multiple of 32, the stride of fpn_resnet18; use 480"):
        resolve_model(parse_spec(_with(tiling__tile=500)))
    model = resolve_model(parse_spec(_with(tiling__tile=612, model__name="magnet_fpn_resnet10", model__width=8)))
    assert model.info.config.size_multiple == 1


def test_the_readme_spec_example_is_valid():
    """The spec shown in README.md (every field with its default or an example) parses as it stands."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme[readme.index("## Job spec"):].split("```yaml", 1)[1].split("```", 1)[0]
    spec = parse_spec(yaml.safe_load(block), "README.md")
    assert spec.model.framework == "segment" and spec.cluster.dask is None and spec.tiling.tiles_per_call == "auto"


def test_the_framework_section_is_a_tagged_union():
    """``model.framework`` picks the one options section that is read (its defaults filled in); the section of
    another framework is an error naming it, not silently ignored."""
    base = {"inputs": {"url": "in"}, "output": {"url": "out"}, "model": {"classes": [{"name": "a"}]}}

    def model(**fields):
        return {**base, "model": {**base["model"], **fields}}

    magnet = parse_spec(model(framework="magnet"))
    assert magnet.model.magnet.scales == 3 and magnet.model.fctl is None
    assert magnet.model.framework_options["scales"] == 3
    assert parse_spec(model()).model.framework_options == {}
    with pytest.raises(SpecError) as err:
        parse_spec(model(framework="fctl", magnet={"scales": 4}))
    (line,) = err.value.problems
    assert line.startswith("model.magnet: ") and "model.framework is fctl" in line
    with pytest.raises(SpecError, match="model.fctl: options of framework fctl, but model.framework is segment"):
        parse_spec(model(fctl={"contexts": [2]}))
    again = parse_spec(yaml.safe_load(magnet.echo()))
    assert again == magnet


def test_bands_and_a_range_per_band():
    spec = parse_spec(_with(inputs__bands=[3, 2, 1, 7], inputs__value_range=[[0, 4095]] * 3 + [[100, 200]],
                            inputs__preview_bands=[0, 1, 2]))
    assert spec.inputs.bands == [3, 2, 1, 7] and spec.inputs.channels == 4
    assert spec.inputs.value_range[3] == (100.0, 200.0)
    assert parse_spec(_with(inputs__value_range=[0, 4095])).inputs.value_range == (0.0, 4095.0)
    assert parse_spec(BASE).inputs.channels == 3
