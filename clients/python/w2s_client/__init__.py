"""A typed helper over the generated w2s.v1 stubs for the calls most scripts need.

Everything else is on the raw stubs (`Client.models`, `.inference`, `.datasets`, `.training`)
with the messages in `w2s.v1.w2s_pb2`.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional, Sequence, Tuple, Union

import grpc

from w2s.v1 import w2s_pb2 as pb
from w2s.v1 import w2s_pb2_grpc as rpc

__all__ = ["Client", "PairScore", "pb", "rpc", "folder_digest"]

# Upload chunk size, as the Rust client's.
CHUNK_BYTES = 1 << 20

Pair = Union[Tuple[str, str, str], "pb.PreferencePair"]


@dataclass(frozen=True)
class PairScore:
    """Scores of one preference pair: chosen, rejected, margin = chosen - rejected, and
    p_chosen = sigmoid(margin)."""

    chosen: float
    rejected: float
    margin: float
    p_chosen: float


def _describe_folder(path: str) -> list:
    files = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not os.path.isfile(full) or name.startswith("."):
            continue
        digest = hashlib.sha256()
        with open(full, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(chunk)
        files.append(pb.ModelFile(name=name, size=os.path.getsize(full), sha256=digest.hexdigest()))
    return files


def folder_digest(files: Iterable["pb.ModelFile"]) -> str:
    """The digest the server stores a folder under: SHA-256 of `name \\t size \\t sha256 \\n`
    lines sorted by name (proto `ModelFile`)."""
    lines = "".join(f"{f.name}\t{f.size}\t{f.sha256}\n" for f in sorted(files, key=lambda f: f.name))
    return hashlib.sha256(lines.encode()).hexdigest()


class Client:
    """A connection to a model server at `target` ("host:port"), optionally with a bearer
    token and TLS root certificates (PEM bytes)."""

    def __init__(self, target: str, token: Optional[str] = None,
                 root_certificates: Optional[bytes] = None):
        options = [("grpc.max_receive_message_length", 256 << 20),
                   ("grpc.max_send_message_length", 256 << 20)]
        if root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        self.models = rpc.ModelsStub(self.channel)
        self.inference = rpc.InferenceStub(self.channel)
        self.datasets = rpc.DatasetsStub(self.channel)
        self.training = rpc.TrainingStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # Models

    def list_models(self) -> list:
        return list(self.models.ListModels(pb.ListModelsRequest(), metadata=self.metadata).models)

    def load_preset(self, name: str, preset: str, seed: int = 0, reward_head: bool = False):
        """Loads a built-in random-init preset (e.g. `tiny-gpt2`) as `name`."""
        request = pb.LoadModelRequest(name=name, preset=preset, seed=seed, reward_head=reward_head)
        return self.models.LoadModel(request, metadata=self.metadata)

    def upload_folder(self, name: str, path: str, reward_head: bool = False, role: str = ""):
        """Loads the HF folder `path` on this machine as `name`: by its digest when the server
        already holds an identical folder, else by streaming its files."""
        files = _describe_folder(path)
        load = pb.LoadModelRequest(name=name, reward_head=reward_head, role=role)
        by_digest = pb.LoadModelRequest()
        by_digest.CopyFrom(load)
        by_digest.uploaded = folder_digest(files)
        try:
            return self.models.LoadModel(by_digest, metadata=self.metadata)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                raise

        def messages() -> Iterator["pb.UploadModelRequest"]:
            yield pb.UploadModelRequest(header=pb.UploadModelHeader(load=load, files=files))
            for f in files:
                with open(os.path.join(path, f.name), "rb") as handle:
                    for chunk in iter(lambda: handle.read(CHUNK_BYTES), b""):
                        yield pb.UploadModelRequest(data=chunk)

        return self.models.UploadModel(messages(), metadata=self.metadata)

    def unload(self, name: str) -> None:
        self.models.UnloadModel(pb.UnloadModelRequest(name=name), metadata=self.metadata)

    # Inference

    def score_pairs(self, model: str, pairs: Sequence[Pair],
                    scoring: int = pb.PAIR_SCORING_MEAN_LOGPROB, max_ctx: int = 0,
                    reference_model: str = "") -> list:
        """Scores (prompt, chosen, rejected) pairs (or `PreferencePair`s); one `PairScore` each.
        `scoring`: PAIR_SCORING_REWARD, _MEAN_LOGPROB (default), _SUM_LOGPROB or _DPO."""
        messages = [p if isinstance(p, pb.PreferencePair)
                    else pb.PreferencePair(prompt=p[0], chosen=p[1], rejected=p[2]) for p in pairs]
        request = pb.ScorePairsRequest(model=model, pairs=messages, scoring=scoring,
                                       max_ctx=max_ctx, reference_model=reference_model)
        response = self.inference.ScorePairs(request, metadata=self.metadata)
        return [PairScore(s.chosen, s.rejected, s.margin, s.p_chosen) for s in response.scores]

    def token_logprobs(self, model: str, texts: Sequence[str], split_dialogue: bool = False,
                       max_ctx: int = 0, truncate: bool = False) -> list:
        """Per text: (token ids, log-probs of each next token, response mask)."""
        request = pb.TokenLogprobsRequest(model=model, texts=list(texts),
                                          split_dialogue=split_dialogue, max_ctx=max_ctx,
                                          truncate=truncate)
        response = self.inference.TokenLogprobs(request, metadata=self.metadata)
        return [(list(s.token_ids), list(s.logprobs), list(s.response_mask))
                for s in response.sequences]

    # Datasets and training

    def upload_pairs(self, name: str, pairs: Sequence[Pair]):
        """Uploads preference pairs as a dataset; returns its `DatasetInfo` (`.id`)."""

        def messages():
            yield pb.UploadDatasetRequest(header=pb.DatasetHeader(name=name))
            for p in pairs:
                if isinstance(p, pb.PreferencePair):
                    p = (p.prompt, p.chosen, p.rejected)
                yield pb.UploadDatasetRequest(pair=pb.PairRow(prompt=p[0], chosen=p[1], rejected=p[2]))

        return self.datasets.UploadDataset(messages(), metadata=self.metadata)

    def start_job(self, objective: int, base_model: str, dataset_ids: Sequence[str],
                  output_model: str, **hyperparameters):
        """Starts a training job (`objective`: e.g. `pb.OBJECTIVE_KIND_SIMPO`); keyword
        arguments are `TrainingHyperparameters` fields. Returns its `JobInfo`."""
        request = pb.StartJobRequest(
            objective=objective, base_model=base_model, dataset_ids=list(dataset_ids),
            output_model=output_model,
            hyperparameters=pb.TrainingHyperparameters(**hyperparameters))
        return self.training.StartJob(request, metadata=self.metadata)

    def follow_job(self, job_id: str, on_event: Optional[Callable] = None):
        """Watches job `job_id` to its end, calling `on_event(JobEvent)` for each event;
        returns the final `JobInfo`."""
        last = None
        for event in self.training.WatchJob(pb.WatchJobRequest(id=job_id), metadata=self.metadata):
            if on_event is not None:
                on_event(event)
            if event.HasField("job"):
                last = event.job
        return last

    def delete_job(self, job_id: str) -> int:
        """Removes finished job `job_id` and its folder (checkpoints, trained model) from the
        server; returns the bytes freed. Models already loaded from it stay resident."""
        response = self.training.DeleteJob(pb.DeleteJobRequest(id=job_id), metadata=self.metadata)
        return response.freed_bytes
