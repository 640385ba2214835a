"""
Operators and sensors driven in this process the way Airflow drives them: execute, defer, the
trigger rebuilt from its serialized kwargs and run to its event, then the method it resumes.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from airflow.sdk.exceptions import TaskDeferred

from airflow_provider_hpc.transport.aio import close_all_sessions

FAST = {"poll_interval": 0.3, "max_poll_interval": 1.5, "max_poll_failures": 8}


class FakeTaskInstance:
    """The little of a task instance the operators use: XCom pushes and the try number."""

    def __init__(self, task_id: str) -> None:
        self.task_id = task_id
        self.dag_id = "soak"
        self.run_id = "soak"
        self.map_index = -1
        self.try_number = 1
        self.xcom: dict[str, Any] = {}

    def xcom_push(self, key: str, value: Any) -> None:
        self.xcom[key] = json.loads(json.dumps(value))



class StateStore:
    """``task_state_store``: what survives from one try to the next."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def set(self, key: str, value: Any, *, retention: Any = None) -> None:
        self.values[key] = json.loads(json.dumps(value))

    def delete(self, key: str) -> None:
        self.values.pop(key, None)

    def clear(self) -> None:
        self.values.clear()



@dataclass
class Outcome:
    """What one run ended with, as the client saw it."""

    kind: str
    name: str
    status: str = "unknown"
    key: str | None = None
    value: Any = None
    error: str | None = None
    tries: int = 0
    lost_submit_answers: int = 0
    events_delivered: int = 0
    extra: dict[str, Any] = field(default_factory=dict)



def drive(operator_factory, ti: FakeTaskInstance, store: StateStore, twice: bool) -> tuple[Any, int]:
    """Run one try as Airflow would: execute, defer, trigger (rebuilt from its kwargs), execute_complete."""
    context: dict[str, Any] = {"ti": ti, "task_state_store": store, "outlet_events": {}}
    operator = operator_factory()
    try:
        return operator.execute(context), 0
    except TaskDeferred as deferred:
        classpath, kwargs = deferred.trigger.serialize()
        trigger = type(deferred.trigger)(**json.loads(json.dumps(kwargs)))
        event = asyncio.run(_first_event(trigger))
        resumed = operator_factory()
        result = getattr(resumed, deferred.method_name)(context, event=event)
        if twice:
            # Events are delivered at least once: a second delivery must give the same result.
            again = getattr(operator_factory(), deferred.method_name)(context, event=event)
            if json.dumps(again, sort_keys=True) != json.dumps(result, sort_keys=True):
                raise AssertionError(f"a second delivery of the event gave another result: {again} != {result}")
            return result, 2
        return result, 1



async def _first_event(trigger: Any) -> dict[str, Any]:
    try:
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")
    finally:
        await close_all_sessions()

