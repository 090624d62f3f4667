"""Rows of the reports store → Reports API messages, and the models' attribute tables."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from session_audit.reports import filters as rf
from session_audit.reports.periods import PERIODS
from session_audit.reports.store import Owner
from session_audit.reports.types import TYPES
from session_audit.v1 import reports_pb2 as pb

SUCCESS = "success"


def _ts(target: object, value: datetime | None) -> None:
    if value is not None:
        target.FromDatetime(value)  # type: ignore[attr-defined]


def definition(r: asyncpg.Record, me: Owner) -> pb.DefinedReport:
    predefined = r["org_id"] is None
    m = pb.DefinedReport(
        id=str(r["id"]), title=r["title"], type=r["type"], query_filter=r["query_filter"],
        query_order=r["query_order"], user_id=r["owner"] or "",
        editable=not predefined and me.may_change(r["owner"]), subscribed=r["subscribed"],
        has_reports=r["has_reports"], predefined=predefined,
    )  # fmt: skip
    _ts(m.created_at, r["created_at"])
    _ts(m.modified_at, r["modified_at"])
    return m


def report(r: asyncpg.Record, me: Owner) -> pb.Report:
    m = pb.Report(
        id=str(r["id"]), title=r["title"], defined_report_id=str(r["defined_report_id"]),
        defined_report_title=r["defined_report_title"] or "", user_id=r["owner"],
        query_filter=r["query_filter"], query_order=r["query_order"], status=r["status"],
        failure=r["failure"] or "", editable=me.may_change(r["owner"]), type=r["type"],
        subscription_id=str(r["subscription_id"] or ""), period=r["period"] or "",
        time_zone=r["time_zone"], rows=min(r["row_count"] or 0, 2**31 - 1),
    )  # fmt: skip
    _ts(m.generated_at, r["generated_at"])
    _ts(m.created_at, r["created_at"])
    _ts(m.modified_at, r["modified_at"])
    _ts(m.period_start, r["period_start"])
    _ts(m.period_end, r["period_end"])
    return m


def subscription(r: asyncpg.Record, me: Owner) -> pb.DefinedReportSubscription:
    m = pb.DefinedReportSubscription(
        id=str(r["id"]), defined_report_id=str(r["defined_report_id"]), user_id=r["owner"],
        period=r["period"], time_zone=r["time_zone"], editable=me.may_change(r["owner"]),
    )  # fmt: skip
    _ts(m.created_at, r["created_at"])
    _ts(m.modified_at, r["modified_at"])
    _ts(m.next_period_start, r["next_period_start"])
    _ts(m.next_run_at, r["next_run_at"])
    return m


A = pb.ReportAttribute
_ID = "A string of digits (64-bit; never a JSON number)."

REPORT_ATTRIBUTES = [
    A(name="id", type="string", read_only=True, unique=True, description="Unique, read-only "
      "report identifier. " + _ID),
    A(name="title", type="string", description="Report title. Default: the definition's."),
    A(name="defined_report_id", type="string",
      description="Definition it was generated from. Default: 11 (Session summary)."),
    A(name="defined_report_title", type="string", read_only=True, expensive=True,
      description="The definition's title."),
    A(name="generated_at", type="datetime", read_only=True,
      description="When generation finished."),
    A(name="user_id", type="string", read_only=True,
      description="The user the report belongs to (the token's e-mail)."),
    A(name="query_filter", type="string", description="Query filter used to create the report."),
    A(name="query_order", type="string",
      description="Query order of returned values used to create the report."),
    A(name="status", type="string", read_only=True, values=["pending", "ready", "failed"],
      description="Generation state."),
    A(name="failure", type="string", read_only=True, description="Why generation failed."),
    A(name="created_at", type="datetime", read_only=True, description="Timestamp of creation."),
    A(name="modified_at", type="datetime", read_only=True,
      description="Timestamp of modification."),
    A(name="editable", type="boolean", read_only=True,
      description="Whether the caller may delete it."),
    A(name="type", type="string", read_only=True, values=[t.key for t in TYPES],
      description="The definition's type."),
    A(name="subscription_id", type="string", read_only=True,
      description="Subscription that generated it; empty for on-demand reports."),
    A(name="period", type="string", read_only=True, values=list(PERIODS),
      description="Period of a scheduled report."),
    A(name="period_start", type="datetime", read_only=True, description="Start of the period."),
    A(name="period_end", type="datetime", read_only=True,
      description="End of the period (exclusive)."),
    A(name="time_zone", type="string", read_only=True, description="Time zone of the period."),
    A(name="rows", type="integer", read_only=True, description="Rows in the report."),
    A(name="criteria", type="array", description="Create only: [{field, value}] equality "
      "criteria, AND-ed with the definition's filter."),
]  # fmt: skip

DEFINED_REPORT_ATTRIBUTES = [
    A(name="id", type="string", read_only=True, unique=True,
      description="Unique and read-only object identifier. " + _ID),
    A(name="title", type="string", required=True, description="Defined report title."),
    A(name="type", type="string", required=True, immutable=True, values=[t.key for t in TYPES],
      description="Immutable. Defined report type."),
    A(name="query_filter", type="string", description="Query filter used to create the report."),
    A(name="query_order", type="string",
      description="Query order of returned values used to create the report."),
    A(name="user_id", type="string", read_only=True, immutable=True,
      description="Immutable. Identifier (e-mail) of the user who created the report."),
    A(name="created_at", type="datetime", read_only=True, description="Timestamp of creation."),
    A(name="modified_at", type="datetime", read_only=True,
      description="Timestamp of modification."),
    A(name="editable", type="boolean", read_only=True,
      description="Whether the caller may change or delete it."),
    A(name="subscribed", type="boolean", read_only=True, expensive=True,
      description="If true, the caller is subscribed to it."),
    A(name="has_reports", type="boolean", read_only=True, expensive=True,
      description="If true, reports visible to the caller were generated from it."),
    A(name="predefined", type="boolean", read_only=True,
      description="One of the twelve built-in definitions (5-16); cannot be changed."),
]  # fmt: skip

SUBSCRIPTION_ATTRIBUTES = [
    A(name="id", type="string", read_only=True, unique=True,
      description="Unique and read-only report subscription identifier. " + _ID),
    A(name="defined_report_id", type="string", required=True,
      description="Defined report identifier."),
    A(name="user_id", type="string", read_only=True,
      description="Identifier (e-mail) of the subscriber: the caller."),
    A(name="period", type="string", required=True, values=list(PERIODS),
      description="Period of generating reports."),
    A(name="time_zone", type="string",
      description="IANA time zone of the calendar periods. Default UTC."),
    A(name="created_at", type="datetime", read_only=True, description="Timestamp of creation."),
    A(name="modified_at", type="datetime", read_only=True,
      description="Timestamp of modification."),
    A(name="editable", type="boolean", read_only=True,
      description="Whether the caller may delete it."),
    A(name="next_period_start", type="datetime", read_only=True,
      description="Start of the next period to report on."),
    A(name="next_run_at", type="datetime", read_only=True,
      description="When that period ends and its report is generated."),
]  # fmt: skip


def criteria_attributes() -> pb.CriteriaAttributesResponse:
    return pb.CriteriaAttributesResponse(
        attributes=[
            pb.CriteriaAttribute(
                name=a.name,
                type=a.kind,
                operators=list(a.operators),
                aliases=list(a.aliases),
                values=list(a.values),
                nullable=a.nullable or a.empty_is_null,
                description=a.description,
            )
            for a in rf.ATTRIBUTES
        ],
        operators=list(rf.OPERATORS),
        result=SUCCESS,
    )
