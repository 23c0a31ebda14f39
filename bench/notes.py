"""What the report says of a target it did not meet: where the time goes, and what would
close the gap. Keyed by (scenario, figure key); shown only when that target is missed.

Each note was written from a profile (py-spy on the API processes, `top` during the
load); re-profile before relying on it after the code changes.
"""

from __future__ import annotations

NOT_MET: dict[tuple[str, str], str] = {
    ("submit", "floor.ratio"): (
        "Group commit shares round trips between concurrent submissions (docs/architecture.md), but each "
        "submission still pays marshmallow's validation, normalisation and `submit.lua`'s bookkeeping, which "
        "the floor's one SET does not; the profile of what remains is issue 12's next step."
    ),
    ("submit", "ratio"): (
        "The baseline is faster than the design's first measurements suggested (docs/architecture.md): under granian, one `send_task` per "
        "job reached about 2,600-2,700 jobs/s here, so 3x would be about 8,000 single-job submissions a second on two "
        "cores shared with Redis and the load generator. During the closed-loop run both cores are busy: each "
        "API process about 65% of a core, redis-server about 33% (the submit Lua script, about 90 us a job), the "
        "load generator about 27%. One API process spends about 340 us of CPU a request; of the Python part "
        "(py-spy), the Redis call is the largest piece (argument packing, the socket round trip, the reply), then "
        "marshmallow validation (about 70 us), then the record's normalisation and JSON; granian's own HTTP "
        "work does not show in py-spy. Fewer server threads help a little (2 threads a process measured about "
        "+20%, less GIL hand-off) but would starve `Prefer: wait`, so 16 stay the default. What would close the "
        "gap: more cores (API processes are stateless and scale out; Redis runs the script at about 11,000 "
        "submissions a second a core), or the batch route, which is the design's answer for high-volume "
        "producers: it accepts over 5x the baseline (the batch figure above). Not done: replacing marshmallow "
        "(the design keeps it as the validator) or hand-encoding the Redis protocol."
    ),
}


def not_met_section(unmet: list[tuple[str, str, str, str]]) -> list[str]:
    """Markdown for missed targets: (scenario, key, label, reached) each, with its note."""
    if not unmet:
        return []
    lines = ["## Targets not met", ""]
    for scenario, key, label, reached in unmet:
        note = NOT_MET.get(
            (scenario, key),
            "No analysis recorded for this target yet: profile it (py-spy) and add one to bench/notes.py.",
        )
        lines += [f"- **{scenario}: {label}** reached {reached}. {note}", ""]
    return lines
