"""Issue 11 item 4: one place for every limit. A knob's field metadata holds the library's limit and,
where a shared Space needs a tighter cost guard, the Studio's range beside it; the Studio's range
lies inside the library's, every value the Studio accepts the library accepts, and the Studio's
refusal names both limits. The prompt has one limit, the library's."""

from __future__ import annotations

import pytest
import torch

from packforcing import knobs, studio
from packforcing.__main__ import policy_fields
from packforcing.cache import make_policy
from packforcing.cache.config import maximum_of
from packforcing.inputs import MAX_PROMPT_CHARS, check_prompt
from tests.conftest import tiny_geometry


@pytest.mark.parametrize("block_frames", [3, 4])
def test_studio_ranges_lie_inside_the_library_limits_and_the_library_accepts_them(block_frames):
    specs = knobs.knob_specs(block_frames)
    for name, (f, policies) in policy_fields().items():
        spec = specs[name]
        if spec.kind not in ("int", "float"):
            continue
        library_min, library_max = f.metadata.get("minimum"), maximum_of(f)
        assert spec.minimum is None or library_min is None or spec.minimum >= library_min, name
        assert spec.maximum is None or library_max is None or spec.maximum <= library_max, name
        assert spec.library_maximum == library_max, name
        if spec.maximum is None:
            continue
        for value in (spec.minimum, spec.maximum):  # the Studio's extremes build in the library
            for policy in policies:
                options = {name: int(value)}
                if name == "archive_blocks":  # the one cross-knob rule: top_k <= archive_blocks
                    options["top_k"] = min(int(value), 16)
                built = make_policy(policy, tiny_geometry(block_frames), compressed_t_offsets=torch.zeros(2), **options)
                assert getattr(built.config, name) == int(value)


def test_the_studio_refusal_names_its_limit_and_the_librarys():
    spec = knobs.knob_specs(4)["top_k"]
    assert spec.maximum < spec.library_maximum  # the Studio's range is the tighter one here
    assert knobs.coerce_knob("packforcing", "top_k", spec.maximum, 16, "int") == spec.maximum
    with pytest.raises(studio.StudioError, match=rf"at most {spec.maximum:g} in the Studio \(the library and the "
                                                 rf"CLI accept up to {spec.library_maximum:g}\)"):
        knobs.coerce_knob("packforcing", "top_k", spec.maximum + 1, 16, "int")
    make_policy("packforcing", tiny_geometry(4), compressed_t_offsets=torch.zeros(2), top_k=int(spec.maximum) + 1)


def test_one_prompt_limit_for_the_library_and_the_studio():
    assert studio.MAX_PROMPT_CHARS == MAX_PROMPT_CHARS
    longest = ("a red circle over a navy background " * 100)[:MAX_PROMPT_CHARS - 1] + "x"
    assert len(longest) == MAX_PROMPT_CHARS
    assert check_prompt(longest) == longest
    assert studio.validate_request(longest, studio.min_seconds(), 0, "window").prompt == longest
    with pytest.raises(ValueError, match="too long"):
        check_prompt(longest + "y")
    with pytest.raises(studio.StudioError, match=f"at most {MAX_PROMPT_CHARS}"):
        studio.validate_request(longest + "y", studio.min_seconds(), 0, "window")
