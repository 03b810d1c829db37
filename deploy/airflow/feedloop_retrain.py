"""Retrain the match recommender when feedloop says so.

Two ways to start it, pick one per deployment:

1. Dataset events (push). Configure a trigger sink
       [[sinks]]
       name = "airflow"
       kind = "airflow"
       url = "http://airflow-webserver:8080"
       airflow_version = 2            # 3: asset events (POST /api/v2/assets/events, asset_id)
       dataset_uri = "feedloop://datasets/{dataset}"
       user = "feedloop"
       password = "..."
   The trigger posts `POST /api/v1/datasets/events` with `dataset_uri` and `extra`; this DAG is
   scheduled on that dataset, and `extra` (manifest URIs, rows, rule) reaches the task through
   `triggering_dataset_events`.

2. A sensor (pull). `feedloop_retrain_sensor` polls the trigger's pull API
   (`GET /v1/triggers?dataset=...`) with an HttpSensor and a cursor kept in an Airflow
   Variable, so that each trigger starts one training run.

Connections: `feedloop_trigger` (HTTP, host = the trigger's URL, password = its API token).
"""

from __future__ import annotations

import json

import pendulum
from airflow import DAG
from airflow.datasets import Dataset
from airflow.decorators import task
from airflow.models import Variable
from airflow.providers.http.sensors.http import HttpSensor

DATASET = "match_outcomes"
FEEDLOOP_DATASET = Dataset(f"feedloop://datasets/{DATASET}")


def train(manifest_uris: list[str], decision_id: str) -> None:
    """Stand-in for the training job: read exactly the committed files the manifests list."""
    import pyarrow.dataset as ds
    import fsspec

    files: list[str] = []
    for uri in manifest_uris:
        with fsspec.open(uri, "r") as f:
            manifest = json.load(f)
        files.extend(f["uri"] for f in manifest["files"])
    table = ds.dataset(files, format="parquet").to_table()
    print(f"decision {decision_id}: training on {table.num_rows} rows from {len(files)} files")


# 1. Push: scheduled on the dataset event the trigger posts.
with DAG(
    dag_id="feedloop_retrain",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    schedule=[FEEDLOOP_DATASET],
    catchup=False,
    tags=["feedloop"],
) as retrain:

    @task
    def train_on_new_partitions(triggering_dataset_events=None) -> None:
        for events in (triggering_dataset_events or {}).values():
            for event in events:
                extra = event.extra or {}
                train(extra.get("manifest_uris", []), extra.get("feedloop_decision_id", ""))

    train_on_new_partitions()


# 2. Pull: a sensor on the trigger's API, one run per new trigger.
def _new_trigger(response) -> bool:
    seen = Variable.get("feedloop_last_trigger", default_var="")
    triggers = response.json().get("triggers", [])
    return bool(triggers) and triggers[0]["id"] != seen


with DAG(
    dag_id="feedloop_retrain_sensor",
    start_date=pendulum.datetime(2026, 11, 1, tz="UTC"),
    schedule="@hourly",
    catchup=False,
    max_active_runs=1,
    tags=["feedloop"],
) as retrain_sensor:
    wait = HttpSensor(
        task_id="wait_for_trigger",
        http_conn_id="feedloop_trigger",
        endpoint=f"/v1/triggers?dataset={DATASET}&limit=1",
        headers={"Authorization": "Bearer {{ conn.feedloop_trigger.password }}"},
        response_check=_new_trigger,
        poke_interval=60,
        timeout=3600,
        mode="reschedule",
    )

    @task
    def train_on_latest_trigger() -> None:
        from airflow.providers.http.hooks.http import HttpHook

        hook = HttpHook(method="GET", http_conn_id="feedloop_trigger")
        token = hook.get_connection("feedloop_trigger").password
        latest = hook.run(
            f"/v1/triggers?dataset={DATASET}&limit=1",
            headers={"Authorization": f"Bearer {token}"},
        ).json()["triggers"][0]
        uris = [p["manifest_uri"] for p in latest["event"]["data"]["partitions"]]
        train(uris, latest["id"])
        Variable.set("feedloop_last_trigger", latest["id"])

    wait >> train_on_latest_trigger()
