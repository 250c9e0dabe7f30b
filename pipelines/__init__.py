"""The preprocess stage: an Apache Beam job from raw text to tokenized ArrayRecord shards."""

import logging


class _DropBeamOptionalClientWarning(logging.Filter):
    # Beam's GCS module warns on import that BigQuery clients are absent; they are only in
    # the [gcp] extra and this job never uses them.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("apitools not found")


logging.getLogger().addFilter(_DropBeamOptionalClientWarning())
