"""`trade-store migrate` turns TTL on for the status table on the local DynamoDB emulator."""

from __future__ import annotations

from adapters.dynamodb import make_client
from config.settings import Settings


def test_migrate_turns_ttl_on_for_expires_at(migrated: Settings) -> None:
    client = make_client(migrated.dynamodb_endpoint_url, migrated.aws_region)
    ttl = client.describe_time_to_live(TableName=migrated.status_table)["TimeToLiveDescription"]
    assert ttl == {"TimeToLiveStatus": "ENABLED", "AttributeName": "expires_at"}
