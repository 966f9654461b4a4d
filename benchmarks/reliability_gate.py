"""Gate attacks: every side door in tests/test_gate_attacks.py, each against a freshly emptied gated SQLite store.

Counts attempts, refusals, refusals found in the audit trail, and bypasses
(a version that fails the policy, or carries evidence that is not its own,
reached @champion or Production). Writes the "gate_attacks" section.

    python benchmarks/reliability_gate.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from common import RESULTS, machine, update_result  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(RESULTS / "reliability.json"))
    args = parser.parse_args()
    from test_gate_attacks import ATTACKS, gate_environment, new_arena, run_attack

    outcomes = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (name, (attack, audited)) in enumerate(ATTACKS.items()):
            arena_folder = Path(folder) / str(index)
            arena_folder.mkdir()
            os.environ.update(gate_environment(arena_folder))
            outcome = run_attack(new_arena(arena_folder), attack)
            outcomes[name] = {"refused": outcome.refused, "bypassed": outcome.promoted,
                              "audited": outcome.audited, "audit_expected": audited, "message": outcome.message[:300]}
            print(f"{'BYPASS' if outcome.promoted else 'refused'}: {name}")
    bypasses = sorted(name for name, o in outcomes.items() if o["bypassed"])
    update_result("gate_attacks", {
        "machine": machine(),
        "attacks_tried": len(outcomes),
        "refused": sum(o["refused"] and not o["bypassed"] for o in outcomes.values()),
        "refusals_audited": sum(o["audited"] for o in outcomes.values() if o["audit_expected"]),
        "audit_expected": sum(o["audit_expected"] for o in outcomes.values()),
        "bypasses_found": len(bypasses),
        "bypasses": bypasses,
        "attacks": outcomes,
    }, args.out)


if __name__ == "__main__":
    main()
