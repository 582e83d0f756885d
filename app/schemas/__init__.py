"""What the API takes and returns, by resource: request bodies (validated at the edge), the
objects it sends (pydantic models, the routes' `response_model`, so the OpenAPI document
says what is sent) and their serializers from the database rows.

jobs (jobs, events, checkpoints, models), files, pool (workers, the queue, usage), admin
(teams, keys, audit), webhooks; common holds the list envelope, the response base and the
documented query parameters.
"""

from app.schemas.jobs import JobCreate, QuantizationIn, TrainingIn

__all__ = ["JobCreate", "QuantizationIn", "TrainingIn"]
