"""
Fault soak: many Muse runs and Rescale runs with harvests while the emulator injects faults.

Two phases, each against an emulator of its own:

1. **in-process** (every delivery path; 100 Muse runs and 50 Rescale runs by default): each run
   goes through the provider's real operators and sensors, the way Airflow drives them:
   ``execute`` in a worker, the deferral's trigger rebuilt from its serialized kwargs and run to
   its event (as a triggerer does), then ``execute_complete`` on a fresh operator instance; the
   event is delivered twice to one run in five (events are at-least-once). A try that fails is
   tried again, up to ``--tries`` times, with the same ``task_state_store`` (Airflow's retries).
2. **airflow** (the real thing, and the volume: 300 Muse runs and 50 Rescale runs by default): a
   private Airflow deployment (API server, scheduler with LocalExecutor, triggerer, SQLite, a
   temporary AIRFLOW_HOME, all on loopback; see ``dev/airflow_stack.py``) runs the
   DAG ``dev/soak/dags/hpc_soak_dag.py``
   once: mapped ``MuseRunOperator`` tasks (about one in seven with a command that exits non-zero;
   task retries set) and Rescale runs, each watched by a deferrable ``RescaleRunSensor`` and then
   harvested by ``RescaleDownloadOutputsOperator``. The emulator's Muse password and Rescale API
   key are random, and every JWT it issues is recorded, so that a secret scan can look for them
   in every task, trigger and service log, every XCom value, every serialized trigger kwargs
   (kept as they are written, since Airflow deletes a trigger row once its task resumes), the
   rendered fields and the raw database. The deployment is stopped whatever happens, and no
   process of it may outlive it.

Faults, on every request the provider makes (the harness's own set-up requests are spared):
10 % 5xx (500, 502, 503, 504 in equal parts), 5 % 429 with ``Retry-After: 1``, 2 % dropped
connections (the service did the work, the answer is cut), and random latency on 10 %.

Checked at the end, against the emulator's own records (and, for phase 2, Airflow's metadata
database and logs):

- every run ends with the outcome the emulator decided (Muse ``COMPLETED`` / ``FAILED``, Rescale
  job ``Completed successfully`` or not), and a good run's result is the right one (phase 2: the
  task is ``success`` or ``failed`` accordingly, and its XCom holds the right stdout);
- no duplicate submission: one Muse submission per try that learned its run's key (a new try
  submits again only after ``NOK``), plus one per try whose submit answer was lost in a dropped
  connection (no client can know such a run was made: it is counted and reported, never hidden);
- no lost result: every run that ended well delivered its result (a run whose every try had its
  submit refused by a gateway error never existed: it is counted apart as never submitted);
- every harvested file has the md5 of the emulator's own file, and no file is missing;
- no Rescale run was stopped;
- phase 2: no secret anywhere (``secrets_found`` is 0) and no process left behind.

Prints the counts; exits 1 when any check fails.

    python scripts/soak.py                                   # both phases (about 8 minutes on 2 cores)
    python scripts/soak.py --phase in-process --muse-runs 8 --rescale-jobs 3 --max-seconds 90   # a short one
    python scripts/soak.py --phase airflow --airflow-muse-runs 12 --airflow-rescale-jobs 2     # phase 2, short

Its modules: ``faults.py`` (the fault plan), ``driving.py`` (operators and sensors driven as
Airflow drives them), ``harness.py`` (the emulator's truth, the counting), ``secret_scan.py``
(what the secret scan looks for), ``workload.py`` (the runs of both phases), ``in_process.py``
and ``airflow_phase.py`` (the two phases), ``cli.py`` (the command line, run by
``scripts/soak.py``). ``dev/cluster/soak.py`` runs phase 2's DAG and checks on the
production-shaped deployment (scenario 5 of ``make test-system``).
"""
