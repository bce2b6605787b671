"""A minimal BentoML service mounting the Label Studio backend the way serving/label_studio.py tells the service
to (deferred_app on the class, the backend built from the instance): proof that the mounting instructions work
under a real ``bentoml serve``, until serving/service.py mounts it.

    AGMM_MODEL=tiny.onnx bentoml serve label_studio_bento_service:MountedSegmenter   # tests/ on the path
"""

from __future__ import annotations

import asyncio
import os
import threading

import bentoml

from agmm_deploy.inference import segment_images
from agmm_deploy.runtime import load_runner
from serving.label_studio import LabelStudioSettings, deferred_app, label_studio_app


@bentoml.asgi_app(deferred_app(lambda: bentoml.get_current_service().label_studio), path="/label-studio")
@bentoml.service(workers=1)
class MountedSegmenter:
    def __init__(self) -> None:
        self.runner = load_runner(os.environ["AGMM_MODEL"], device="cpu")
        self.model_version = "mounted-0"
        lock = threading.Lock()

        def run(images):
            with lock:
                return segment_images(self.runner, images)

        async def segment(images):
            return await asyncio.to_thread(run, images)

        self.label_studio = label_studio_app(segment, self.runner.meta.classes, lambda: self.model_version,
                                             LabelStudioSettings.from_env())

    @bentoml.api
    def info(self) -> dict:
        return {"model_version": self.model_version, "training": self.label_studio.state.job.status()}
