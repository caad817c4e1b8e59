#!/usr/bin/env python3
"""A Python client of the superficial model server, generated from proto/w2s/v1/w2s.proto.

It lists the models, loads a tiny preset, scores a preference pair, uploads a small dataset,
starts a SimPO training job and watches it to the end, then prints one JSON summary line.

    pip install grpcio grpcio-tools
    python clients/python/w2s_example.py --server 127.0.0.1:50051 [--token TOKEN]

The stubs are generated on the fly with grpcio-tools into a temporary folder (or into
--stubs DIR), so the .proto file stays the only source of truth.
"""
import argparse
import importlib
import json
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def load_stubs(out_dir):
    from grpc_tools import protoc
    import grpc_tools

    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    code = protoc.main([
        "grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}", os.path.join(PROTO_ROOT, "w2s", "v1", "w2s.proto"),
    ])
    if code != 0:
        raise SystemExit(f"protoc failed with {code}")
    sys.path.insert(0, out_dir)
    return importlib.import_module("w2s.v1.w2s_pb2"), importlib.import_module("w2s.v1.w2s_pb2_grpc")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", required=True, help="HOST:PORT of a running model-server")
    ap.add_argument("--token", default=os.environ.get("W2S_TOKEN"))
    ap.add_argument("--stubs", help="folder for the generated stubs (default: a temporary one)")
    args = ap.parse_args()

    import grpc

    stubs_dir = args.stubs or tempfile.mkdtemp(prefix="w2s-stubs-")
    os.makedirs(stubs_dir, exist_ok=True)
    pb, rpc = load_stubs(stubs_dir)
    channel = grpc.insecure_channel(args.server)
    metadata = [("authorization", f"Bearer {args.token}")] if args.token else []
    models = rpc.ModelsStub(channel)
    inference = rpc.InferenceStub(channel)
    datasets = rpc.DatasetsStub(channel)
    training = rpc.TrainingStub(channel)

    models.LoadModel(pb.LoadModelRequest(name="py-policy", preset="tiny-gpt2", seed=1), metadata=metadata)
    listed = [m.name for m in models.ListModels(pb.ListModelsRequest(), metadata=metadata).models]

    pair = pb.PreferencePair(chosen="\n\nHuman: hi?\n\nAssistant: Hello, how can I help?",
                             rejected="\n\nHuman: hi?\n\nAssistant: Go away.")
    scores = inference.ScorePairs(pb.ScorePairsRequest(
        model="py-policy", pairs=[pair], scoring=pb.PAIR_SCORING_MEAN_LOGPROB), metadata=metadata)

    def rows():
        yield pb.UploadDatasetRequest(header=pb.DatasetHeader(name="python-pairs"))
        for i in range(8):
            yield pb.UploadDatasetRequest(pair=pb.PairRow(
                chosen=f"\n\nHuman: q{i}?\n\nAssistant: a kind answer {i}",
                rejected=f"\n\nHuman: q{i}?\n\nAssistant: no {i}"))

    dataset = datasets.UploadDataset(rows(), metadata=metadata)
    job = training.StartJob(pb.StartJobRequest(
        objective=pb.OBJECTIVE_KIND_SIMPO, base_model="py-policy", dataset_ids=[dataset.id],
        output_model="py-policy-simpo",
        hyperparameters=pb.TrainingHyperparameters(
            lr=1e-3, batch_size=4, minibatch_size=2, epochs=1,
            schedule=pb.LR_SCHEDULE_WARMUP_CONSTANT, seed=0)), metadata=metadata)
    steps = []
    final = None
    for event in training.WatchJob(pb.WatchJobRequest(id=job.id), metadata=metadata):
        if event.HasField("step"):
            steps.append({"step": event.step.step, "loss": event.step.loss})
        final = event.job
    print(json.dumps({
        "models": listed,
        "p_chosen": scores.scores[0].p_chosen,
        "dataset_rows": dataset.rows,
        "job_state": pb.JobState.Name(final.state),
        "steps": steps,
    }))
    return 0 if final.state == pb.JOB_STATE_SUCCEEDED else 1


if __name__ == "__main__":
    sys.exit(main())
