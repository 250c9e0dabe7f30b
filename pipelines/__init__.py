"""The preprocess stage: an Apache Beam job from raw text to tokenized ArrayRecord shards."""

import logging

JOB_FAILURE_PREFIX = "preprocess failed: "


class _QuietExpectedBeamLogs(logging.Filter):
    """Drops two log records that are noise to our users:

    - Beam's GCS module warns on import that BigQuery clients are absent; they come only
      with the [gcp] extra and this job never uses them.
    - The runner logs a failing DoFn's traceback; for our own JobFailure the launcher
      already prints the one line that says what to fix, and for SIGINT or SIGTERM its exit status
      (pipelines/signals.py).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith(("apitools not found", "KeyboardInterrupt", "pipelines.signals.Terminated"))
                    or JOB_FAILURE_PREFIX in message)


logging.getLogger().addFilter(_QuietExpectedBeamLogs())
logging.getLogger("apache_beam.runners.common").addFilter(_QuietExpectedBeamLogs())
