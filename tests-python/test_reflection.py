#!/usr/bin/env python3
"""End to end through a real C-core gRPC client (grpcio), with no .proto files:
every message type comes from the payment backend's server reflection.

Starts target/debug/payment-backend on SQLite in a temp dir and free ports,
then walks a payment lifecycle and checks health and errors.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import grpc
from harness import RESULTS, check, free_port, summary
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf import message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARY = os.environ.get("PAYMENT_BACKEND_BINARY", os.path.join(ROOT, "target", "debug", "payment-backend"))


class Reflected:
    """Message classes and method paths learned through reflection."""

    def __init__(self, channel):
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        self.pool = descriptor_pool.DescriptorPool()
        self.services = self._list(stub)
        seen = set()
        for svc in self.services:
            self._load(stub, svc, seen)

    def _ask(self, stub, **kw):
        reply = next(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kw)])))
        if reply.HasField("error_response"):
            raise AssertionError(f"reflection error: {reply.error_response}")
        return reply

    def _list(self, stub):
        reply = self._ask(stub, list_services="")
        return [s.name for s in reply.list_services_response.service]

    def _load(self, stub, symbol, seen):
        reply = self._ask(stub, file_containing_symbol=symbol)
        self._add_files(stub, reply.file_descriptor_response.file_descriptor_proto, seen)

    def _add_files(self, stub, blobs, seen):
        # The server may send a file without its imports: fetch those by
        # name, and add each file after its imports.
        protos = {p.name: p for p in (descriptor_pb2.FileDescriptorProto.FromString(b) for b in blobs)}
        for proto in protos.values():
            self._add(stub, proto, protos, seen)

    def _add(self, stub, proto, batch, seen):
        if proto.name in seen:
            return
        for dep in proto.dependency:
            if dep in seen:
                continue
            if dep.startswith("google/protobuf/"):
                self._add_well_known(dep, seen)
            elif dep in batch:
                self._add(stub, batch[dep], batch, seen)
            else:
                reply = self._ask(stub, file_by_filename=dep)
                self._add_files(stub, reply.file_descriptor_response.file_descriptor_proto, seen)
        if proto.name not in seen:
            self.pool.Add(proto)
            seen.add(proto.name)

    def _add_well_known(self, name, seen):
        from google.protobuf import timestamp_pb2  # noqa: F401 (registers the file)
        fd = descriptor_pool.Default().FindFileByName(name)
        proto = descriptor_pb2.FileDescriptorProto()
        fd.CopyToProto(proto)
        self.pool.Add(proto)
        seen.add(name)

    def message(self, full_name):
        return message_factory.GetMessageClass(self.pool.FindMessageTypeByName(full_name))

    def unary(self, channel, service, method):
        svc = self.pool.FindServiceByName(service)
        m = svc.FindMethodByName(method)
        req = self.message(m.input_type.full_name)
        resp = self.message(m.output_type.full_name)
        call = channel.unary_unary(
            f"/{service}/{method}",
            request_serializer=req.SerializeToString,
            response_deserializer=resp.FromString,
        )

        def invoke(fields, metadata=()):
            msg = json_format.ParseDict(fields, req())
            return call.with_call(msg, metadata=metadata, timeout=10)

        return invoke




def main():
    if not os.path.exists(BINARY):
        print(f"{BINARY} is missing: run `cargo build -p payment-backend` first")
        return 1
    tmp = tempfile.mkdtemp()
    port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [BINARY, "serve", "--listen", f"127.0.0.1:{port}", "--metrics-listen", f"127.0.0.1:{metrics_port}",
         "--database-url", f"sqlite://{tmp}/payments.db"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=30)
        r = Reflected(channel)

        def services_are_listed():
            for s in ("payments.v1.PaymentService", "payments.v1.AccountService", "grpc.health.v1.Health"):
                assert s in r.services, r.services

        def health_is_serving():
            stub = health_pb2_grpc.HealthStub(channel)
            for svc in ("", "payments.v1.PaymentService"):
                st = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5).status
                assert st == health_pb2.HealthCheckResponse.SERVING, st

        def lifecycle():
            create_account = r.unary(channel, "payments.v1.AccountService", "CreateAccount")
            deposit = r.unary(channel, "payments.v1.AccountService", "Deposit")
            balance = r.unary(channel, "payments.v1.AccountService", "GetAccountBalance")
            create = r.unary(channel, "payments.v1.PaymentService", "CreatePayment")
            capture = r.unary(channel, "payments.v1.PaymentService", "CapturePayment")
            refund = r.unary(channel, "payments.v1.PaymentService", "RefundPayment")
            get = r.unary(channel, "payments.v1.PaymentService", "GetPayment")
            key = lambda: uuid.uuid4().hex  # noqa: E731
            payer, _ = create_account({"idempotencyKey": key(), "owner": "alice", "currency": "EUR"})
            payee, _ = create_account({"idempotencyKey": key(), "owner": "shop", "currency": "EUR"})
            deposit({"idempotencyKey": key(), "accountId": payer.id, "amount": {"amountMinor": "5000", "currency": "EUR"}})
            req = {"idempotencyKey": key(), "payerAccountId": payer.id, "payeeAccountId": payee.id,
                   "amount": {"amountMinor": "1200", "currency": "EUR"}, "captureMethod": "CAPTURE_METHOD_MANUAL",
                   "metadata": {"order": "o-1"}}
            p, _ = create(req)
            assert json_format.MessageToDict(p)["status"] == "PAYMENT_STATUS_REQUIRES_CAPTURE", p
            again, call = create(req)
            assert again.id == p.id
            assert ("idempotent-replayed", "true") in call.initial_metadata(), call.initial_metadata()
            p, _ = capture({"idempotencyKey": key(), "paymentId": p.id, "amountMinor": "1000"})
            assert json_format.MessageToDict(p)["status"] == "PAYMENT_STATUS_CAPTURED", p
            refund({"idempotencyKey": key(), "paymentId": p.id, "amountMinor": "400"})
            p, _ = get({"paymentId": p.id})
            d = json_format.MessageToDict(p)
            assert d["status"] == "PAYMENT_STATUS_PARTIALLY_REFUNDED", d
            assert d["amountRefunded"]["amountMinor"] == "400", d
            b, _ = balance({"accountId": payer.id})
            assert json_format.MessageToDict(b)["available"]["amountMinor"] == "4400", b

        def invalid_argument_names_the_field():
            create = r.unary(channel, "payments.v1.PaymentService", "CreatePayment")
            try:
                create({"idempotencyKey": "x1", "payerAccountId": "acct_a", "payeeAccountId": "acct_b",
                        "amount": {"amountMinor": "-1", "currency": "EUR"}})
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                assert "amount.amount_minor" in e.details(), e.details()
                bins = dict(e.trailing_metadata() or ())
                assert "grpc-status-details-bin" in bins, bins
            else:
                raise AssertionError("a negative amount was accepted")

        def huge_values_give_readable_errors():
            # grpcio refuses trailers above 16 KiB (RESOURCE_EXHAUSTED "received
            # metadata size exceeds hard limit"): an error that echoed a huge
            # value would hide what was wrong.
            balance = r.unary(channel, "payments.v1.AccountService", "GetAccountBalance")
            create_account = r.unary(channel, "payments.v1.AccountService", "CreateAccount")
            create = r.unary(channel, "payments.v1.PaymentService", "CreatePayment")
            huge = "x" * 60_000
            base = {"idempotencyKey": uuid.uuid4().hex, "payerAccountId": "acct_a", "payeeAccountId": "acct_b",
                    "amount": {"amountMinor": "10", "currency": "EUR"}}
            cases = [
                ("GetAccountBalance account_id", lambda: balance({"accountId": huge}), "account_id"),
                ("CreateAccount currency", lambda: create_account(
                    {"idempotencyKey": uuid.uuid4().hex, "owner": "o", "currency": huge}), "currency"),
                ("CreateAccount owner with NUL", lambda: create_account(
                    {"idempotencyKey": uuid.uuid4().hex, "owner": "a\u0000b", "currency": "EUR"}), "owner"),
                ("CreatePayment metadata key", lambda: create(dict(base, metadata={huge: "v"})), "metadata["),
                ("CreatePayment 2000 bad metadata pairs", lambda: create(
                    dict(base, metadata={f"{i}{'k' * 60}": "\u0000" for i in range(2000)})), "metadata"),
                ("CreatePayment description", lambda: create(dict(base, description=huge)), "description"),
            ]
            for name, call, field in cases:
                try:
                    call()
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, e.code(), e.details()[:200])
                    assert field in e.details(), (name, e.details()[:200])
                    assert len(e.details()) < 4096, (name, len(e.details()))
                    bins = dict(e.trailing_metadata() or ())
                    assert "grpc-status-details-bin" in bins, (name, bins.keys())
                else:
                    raise AssertionError(f"{name}: accepted")

        check("reflection lists the services", services_are_listed)
        check("grpc.health.v1 reports SERVING", health_is_serving)
        check("payment lifecycle with reflected types", lifecycle)
        check("INVALID_ARGUMENT names the field and carries details", invalid_argument_names_the_field)
        check("errors about huge values stay readable by grpcio", huge_values_give_readable_errors)
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
        check_exit = code == 0
        RESULTS["passed" if check_exit else "failed"] += 1
        print(("ok   " if check_exit else "FAIL ") + f"SIGTERM exits 0 (got {code})")
        if not check_exit:
            sys.stdout.write(proc.stderr.read().decode(errors="replace"))
        shutil.rmtree(tmp, ignore_errors=True)
    return summary()


if __name__ == "__main__":
    sys.exit(main())
