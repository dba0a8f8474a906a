"""Per-model retraining commands (MODELLOOP_MONITOR_RETRAIN_COMMANDS) are checked at start-up,
naming the model whose template is bad. That the sidecar runs them is tested with a real one in
tests/training/test_gate.py."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from monitoring.settings import MonitorSettings


@pytest.mark.parametrize(("commands", "error"), [
    # a field the template cannot have
    ({"iris": "retrain.sh {model} {window}"},
     "model 'iris': bad command template 'retrain.sh {model} {window}': KeyError: 'window'"),
    # quotes a shell could not split
    ({"iris": "retrain.sh '{model}"},
     "model 'iris': bad command template \"retrain.sh '{model}\": ValueError: No closing quotation"),
    # nothing to run
    ({"iris": "  "}, "model 'iris': the command is empty"),
])
def test_a_bad_per_model_command_is_refused_naming_the_model(commands: dict[str, str],
                                                             error: str) -> None:
    with pytest.raises(ValidationError) as info:
        MonitorSettings(retrain_commands=commands)
    assert error in str(info.value)


def test_per_model_commands_come_from_json_in_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELLOOP_MONITOR_RETRAIN_COMMANDS",
                       '{"iris": "python pipeline.py {model} {trigger} \'{reason}\'"}')
    assert MonitorSettings().retrain_commands == {
        "iris": "python pipeline.py {model} {trigger} '{reason}'"}
