"""The payment API as a grpcio client sees it: stubs generated from proto/
with grpcio-tools on first use, and the calls a test makes most."""

import importlib
import os
import sys
import tempfile
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_MODULES = {}


def stubs():
    """The generated modules: accounts_pb2(_grpc), payments_pb2(_grpc),
    types_pb2 of payments.v1, generated once per process."""
    if _MODULES:
        return _MODULES
    from grpc_tools import protoc
    import grpc_tools

    out = tempfile.mkdtemp(prefix="tollgate-stubs-")
    include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    protos = [f"payments/v1/{n}.proto" for n in ("types", "accounts", "payments", "events")]
    rc = protoc.main(["protoc", f"-I{os.path.join(ROOT, 'proto')}", f"-I{include}",
                      f"--python_out={out}", f"--grpc_python_out={out}", *protos])
    if rc != 0:
        raise RuntimeError(f"protoc failed ({rc}) on {protos}")
    sys.path.insert(0, out)
    for name in ("types_pb2", "accounts_pb2", "accounts_pb2_grpc", "payments_pb2",
                 "payments_pb2_grpc"):
        _MODULES[name] = importlib.import_module(f"payments.v1.{name}")
    return _MODULES


def key():
    return str(uuid.uuid4())


class Client:
    """Accounts and payments over one channel."""

    def __init__(self, channel, metadata=()):
        m = stubs()
        self.m = m
        self.metadata = tuple(metadata)
        self.accounts = m["accounts_pb2_grpc"].AccountServiceStub(channel)
        self.payments = m["payments_pb2_grpc"].PaymentServiceStub(channel)

    def usd(self, minor):
        return self.m["types_pb2"].Money(amount_minor=minor, currency="USD")

    def account(self, funds=0, timeout=10):
        a = self.m["accounts_pb2"]
        acct = self.accounts.CreateAccount(
            a.CreateAccountRequest(idempotency_key=key(), owner="test", currency="USD"),
            timeout=timeout, metadata=self.metadata)
        if funds:
            self.deposit(acct.id, funds, timeout=timeout)
        return acct.id

    def deposit(self, account_id, minor, timeout=10):
        a = self.m["accounts_pb2"]
        return self.accounts.Deposit(
            a.DepositRequest(idempotency_key=key(), account_id=account_id, amount=self.usd(minor)),
            timeout=timeout, metadata=self.metadata)

    def balance(self, account_id, timeout=10):
        a = self.m["accounts_pb2"]
        return self.accounts.GetAccountBalance(
            a.GetAccountBalanceRequest(account_id=account_id), timeout=timeout,
            metadata=self.metadata)

    def lifecycle(self, timeout=10):
        """Authorize, capture, refund part and read back one payment of 1000
        between two new accounts; returns (payment, refund, payer, payee)."""
        p = self.m["payments_pb2"]
        payer, payee = self.account(5000, timeout), self.account(0, timeout)
        created = self.payments.CreatePayment(
            p.CreatePaymentRequest(idempotency_key=key(), payer_account_id=payer,
                                   payee_account_id=payee, amount=self.usd(1000),
                                   capture_method=p.CAPTURE_METHOD_MANUAL,
                                   description="pod test"),
            timeout=timeout, metadata=self.metadata)
        if created.status != p.PAYMENT_STATUS_REQUIRES_CAPTURE:
            raise AssertionError(f"created as {p.PaymentStatus.Name(created.status)}")
        self.payments.CapturePayment(
            p.CapturePaymentRequest(idempotency_key=key(), payment_id=created.id),
            timeout=timeout, metadata=self.metadata)
        refund = self.payments.RefundPayment(
            p.RefundPaymentRequest(idempotency_key=key(), payment_id=created.id,
                                   amount_minor=300, reason="partial"),
            timeout=timeout, metadata=self.metadata)
        got = self.payments.GetPayment(p.GetPaymentRequest(payment_id=created.id),
                                       timeout=timeout, metadata=self.metadata)
        return got, refund, payer, payee
