"""The synthesised CloudFormation template holds what the services profile needs (README)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from aws_cdk.assertions import Annotations, Match, Template
from synth import CERTIFICATE_ARN, Synthesised, synthesise
from trade_store_infra.stack import (
    API_KEYS_COMMAND,
    API_KEYS_FILE,
    API_TABLE_ACTIONS,
    BATCH_INDEX,
    HEALTH_CHECK_PATH,
    RECOVERY_DIR,
    RECOVERY_MOUNT,
    TradeStoreStack,
)

# --- helpers -------------------------------------------------------------------------


def resources(template: Template, kind: str) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = template.find_resources(kind)
    return found


def only(template: Template, kind: str) -> tuple[str, dict[str, Any]]:
    found = resources(template, kind)
    assert len(found) == 1, f"expected one {kind}, found {sorted(found)}"
    return next(iter(found.items()))


def logical_id(template: Template, kind: str, prefix: str) -> str:
    ids = [k for k in resources(template, kind) if k.startswith(prefix)]
    assert len(ids) == 1, f"expected one {kind} named {prefix}*, found {ids}"
    return ids[0]


def container(template: Template, name: str) -> dict[str, Any]:
    for definition in resources(template, "AWS::ECS::TaskDefinition").values():
        for candidate in definition["Properties"]["ContainerDefinitions"]:
            if candidate["Name"] == name:
                result: dict[str, Any] = candidate
                return result
    raise AssertionError(f"no container named {name}")


def task_definition_of(template: Template, name: str) -> dict[str, Any]:
    for definition in resources(template, "AWS::ECS::TaskDefinition").values():
        names = [c["Name"] for c in definition["Properties"]["ContainerDefinitions"]]
        if name in names:
            result: dict[str, Any] = definition["Properties"]
            return result
    raise AssertionError(f"no task definition with container {name}")


def env_of(template: Template, name: str) -> dict[str, Any]:
    return {e["Name"]: e["Value"] for e in container(template, name)["Environment"]}


def service(template: Template, prefix: str) -> dict[str, Any]:
    return resources(template, "AWS::ECS::Service")[
        logical_id(template, "AWS::ECS::Service", prefix)
    ]


def table_arn(template: Template) -> dict[str, Any]:
    return {"Fn::GetAtt": [only(template, "AWS::DynamoDB::Table")[0], "Arn"]}


def index_arn(template: Template) -> dict[str, Any]:
    return {"Fn::Join": ["", [table_arn(template), f"/index/{BATCH_INDEX}"]]}


def statements(template: Template) -> list[tuple[str, dict[str, Any]]]:
    return [
        (policy_id, statement)
        for policy_id, policy in resources(template, "AWS::IAM::Policy").items()
        for statement in policy["Properties"]["PolicyDocument"]["Statement"]
    ]


def as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


# --- DynamoDB --------------------------------------------------------------------------


def test_status_table_is_on_demand_with_ttl_and_point_in_time_recovery(dev: Synthesised) -> None:
    dev.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "KeySchema": [{"AttributeName": "request_id", "KeyType": "HASH"}],
            "AttributeDefinitions": Match.array_with(
                [{"AttributeName": "request_id", "AttributeType": "S"}]
            ),
            "BillingMode": "PAY_PER_REQUEST",
            "TimeToLiveSpecification": {"AttributeName": "expires_at", "Enabled": True},
            "PointInTimeRecoverySpecification": {"PointInTimeRecoveryEnabled": True},
        },
    )


def test_status_table_has_the_sparse_batch_items_index(dev: Synthesised) -> None:
    dev.template.has_resource_properties(
        "AWS::DynamoDB::Table",
        {
            "AttributeDefinitions": Match.array_with(
                [
                    {"AttributeName": "batch_id", "AttributeType": "S"},
                    {"AttributeName": "batch_index", "AttributeType": "N"},
                ]
            ),
            "GlobalSecondaryIndexes": [
                {
                    "IndexName": "batch_items",
                    "KeySchema": [
                        {"AttributeName": "batch_id", "KeyType": "HASH"},
                        {"AttributeName": "batch_index", "KeyType": "RANGE"},
                    ],
                    "Projection": {"ProjectionType": "ALL"},
                }
            ],
        },
    )


# --- PostgreSQL ------------------------------------------------------------------------


def test_database_is_multi_az_postgres_with_generated_secret(dev: Synthesised) -> None:
    _, db = only(dev.template, "AWS::RDS::DBInstance")
    props = db["Properties"]
    assert props["MultiAZ"] is True
    assert props["Engine"] == "postgres"
    assert props["StorageEncrypted"] is True
    assert props["PubliclyAccessible"] is False
    assert props["DBName"] == "trade_store"
    assert "{{resolve:secretsmanager:" in json.dumps(props["MasterUserPassword"])
    assert db["DeletionPolicy"] == "Snapshot"


def test_database_url_secret_is_composed_without_a_plaintext_password(dev: Synthesised) -> None:
    secrets = resources(dev.template, "AWS::SecretsManager::Secret")
    url_id = logical_id(dev.template, "AWS::SecretsManager::Secret", "DatabaseUrl")
    joined = secrets[url_id]["Properties"]["SecretString"]["Fn::Join"][1]
    text = json.dumps(joined)
    assert joined[0].startswith("postgresql+psycopg://trade_store:{{resolve:secretsmanager:")
    assert ":SecretString:password::}}@" in text
    assert "Endpoint.Address" in text
    assert joined[-1].endswith("/trade_store?sslmode=require")
    # The generated password can go into a URL unescaped.
    generated = next(s for k, s in secrets.items() if k != url_id and "ApiKeys" not in k)
    excluded = generated["Properties"]["GenerateSecretString"]["ExcludeCharacters"]
    assert set(":/@?#%&+ ") <= set(excluded)

    for name in ("api", "processor", "migrate"):
        spec = container(dev.template, name)
        database_url = {"Name": "TRADE_STORE_DATABASE_URL", "ValueFrom": {"Ref": url_id}}
        assert database_url in spec["Secrets"]
        assert "TRADE_STORE_DATABASE_URL" not in env_of(dev.template, name)


# --- Kafka -------------------------------------------------------------------------------


def test_msk_has_three_brokers_across_the_three_private_subnets(dev: Synthesised) -> None:
    _, cluster = only(dev.template, "AWS::MSK::Cluster")
    props = cluster["Properties"]
    assert props["NumberOfBrokerNodes"] == 3
    subnets = props["BrokerNodeGroupInfo"]["ClientSubnets"]
    assert len(subnets) == 3
    assert all(s["Ref"].startswith("VpcprivateSubnet") for s in subnets)
    assert props["EncryptionInfo"]["EncryptionInTransit"] == {
        "ClientBroker": "PLAINTEXT",
        "InCluster": True,
    }
    assert props["KafkaVersion"].endswith(".kraft")
    _, config = only(dev.template, "AWS::MSK::Configuration")
    server = config["Properties"]["ServerProperties"].splitlines()
    assert "min.insync.replicas=2" in server
    assert "unclean.leader.election.enable=false" in server


def test_kafka_is_reachable_only_from_api_and_processor(dev: Synthesised) -> None:
    kafka_sg = logical_id(dev.template, "AWS::EC2::SecurityGroup", "KafkaSg")
    rules = [
        r["Properties"]
        for r in resources(dev.template, "AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [kafka_sg, "GroupId"]}
    ]
    sources = sorted(r["SourceSecurityGroupId"]["Fn::GetAtt"][0] for r in rules)
    assert [s.split("Sg")[0] for s in sources] == ["Api", "Processor"]
    assert {(r["FromPort"], r["ToPort"]) for r in rules} == {(9092, 9092)}
    _, sg = only_sg(dev.template, kafka_sg)
    assert "SecurityGroupIngress" not in sg["Properties"]


def only_sg(template: Template, sg_id: str) -> tuple[str, dict[str, Any]]:
    return sg_id, resources(template, "AWS::EC2::SecurityGroup")[sg_id]


def test_database_is_reachable_only_from_the_three_task_roles(dev: Synthesised) -> None:
    db_sg = logical_id(dev.template, "AWS::EC2::SecurityGroup", "DatabaseSg")
    rules = [
        r["Properties"]
        for r in resources(dev.template, "AWS::EC2::SecurityGroupIngress").values()
        if r["Properties"]["GroupId"] == {"Fn::GetAtt": [db_sg, "GroupId"]}
    ]
    sources = sorted(r["SourceSecurityGroupId"]["Fn::GetAtt"][0].split("Sg")[0] for r in rules)
    assert sources == ["Api", "Migrate", "Processor"]
    assert {(r["FromPort"], r["ToPort"]) for r in rules} == {(5432, 5432)}


def test_containers_get_the_services_profile_settings(dev: Synthesised) -> None:
    brokers = logical_id(dev.template, "Custom::AWS", "KafkaBootstrapBrokers")
    for name in ("api", "processor", "migrate"):
        env = env_of(dev.template, name)
        assert env["TRADE_STORE_PROFILE"] == "services"
        assert env["TRADE_STORE_KAFKA_BOOTSTRAP_SERVERS"] == {
            "Fn::GetAtt": [brokers, "BootstrapBrokerString"]
        }
        assert env["TRADE_STORE_STATUS_TABLE"] == {
            "Ref": only(dev.template, "AWS::DynamoDB::Table")[0]
        }
        assert env["TRADE_STORE_AWS_REGION"] == {"Ref": "AWS::Region"}
        assert env["TRADE_STORE_REPLICATION_FACTOR"] == "3"
        assert "TRADE_STORE_DYNAMODB_ENDPOINT_URL" not in env
    # The bootstrap string comes from MSK's API, for exactly this cluster.
    dev.template.has_resource_properties(
        "AWS::IAM::Policy",
        {
            "PolicyDocument": {
                "Statement": [
                    {
                        "Action": "kafka:GetBootstrapBrokers",
                        "Effect": "Allow",
                        "Resource": {"Fn::GetAtt": ["Kafka", "Arn"]},
                    }
                ]
            }
        },
    )


# --- ECS -------------------------------------------------------------------------------


def test_two_fargate_services_from_one_image(dev: Synthesised) -> None:
    services = resources(dev.template, "AWS::ECS::Service")
    assert len(services) == 2
    assert all(s["Properties"]["LaunchType"] == "FARGATE" for s in services.values())
    images = {json.dumps(container(dev.template, n)["Image"]) for n in ("api", "processor")}
    images.add(json.dumps(container(dev.template, "migrate")["Image"]))
    assert len(images) == 1
    for s in services.values():
        network = s["Properties"]["NetworkConfiguration"]["AwsvpcConfiguration"]
        assert network["AssignPublicIp"] == "DISABLED"


def test_api_service_behind_the_alb_with_health_check(dev: Synthesised) -> None:
    assert container(dev.template, "api")["Command"][-1].endswith("exec trade-store serve")
    assert container(dev.template, "api")["PortMappings"] == [
        {"ContainerPort": 8000, "Protocol": "tcp"}
    ]
    api = service(dev.template, "ApiService")["Properties"]
    assert api["LoadBalancers"][0]["ContainerName"] == "api"
    assert api["LoadBalancers"][0]["ContainerPort"] == 8000
    assert api["DeploymentConfiguration"]["DeploymentCircuitBreaker"] == {
        "Enable": True,
        "Rollback": True,
    }
    dev.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::TargetGroup",
        {
            "HealthCheckPath": HEALTH_CHECK_PATH,
            "Matcher": {"HttpCode": "200"},
            "Port": 8000,
            "Protocol": "HTTP",
            "TargetType": "ip",
        },
    )
    assert HEALTH_CHECK_PATH == "/api/v1/health/live"
    # Forwarded client addresses (per-IP quotas, logs) are believed from the VPC only.
    trusted = env_of(dev.template, "api")["TRADE_STORE_TRUSTED_PROXIES"]
    assert trusted["Fn::GetAtt"][1] == "CidrBlock"
    dev.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::LoadBalancer", {"Scheme": "internal"}
    )
    dev.template.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener", {"Port": 80, "Protocol": "HTTP"}
    )


def test_api_autoscales_on_cpu(dev: Synthesised) -> None:
    dev.template.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget",
        {"MinCapacity": 2, "MaxCapacity": 6, "ScalableDimension": "ecs:service:DesiredCount"},
    )
    dev.template.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalingPolicy",
        {
            "PolicyType": "TargetTrackingScaling",
            "TargetTrackingScalingPolicyConfiguration": Match.object_like(
                {
                    "PredefinedMetricSpecification": {
                        "PredefinedMetricType": "ECSServiceAverageCPUUtilization"
                    },
                    "TargetValue": 60,
                }
            ),
        },
    )
    # Autoscaling owns the count: a deployment must not reset it.
    assert "DesiredCount" not in service(dev.template, "ApiService")["Properties"]


def test_processor_runs_the_dataflow_one_task_at_a_time(dev: Synthesised) -> None:
    spec = container(dev.template, "processor")
    assert spec["Command"] == ["trade-store", "process"]
    assert spec["StopTimeout"] == 120
    assert "PortMappings" not in spec
    processor = service(dev.template, "ProcessorService")["Properties"]
    assert processor["DesiredCount"] == 1
    # Never two processors on one recovery store, not even while deploying.
    assert processor["DeploymentConfiguration"]["MinimumHealthyPercent"] == 0
    assert processor["DeploymentConfiguration"]["MaximumPercent"] == 100
    assert env_of(dev.template, "processor")["TRADE_STORE_PROCESSOR_WORKERS"] == "2"


def test_processor_recovery_dir_is_on_efs(dev: Synthesised) -> None:
    spec = container(dev.template, "processor")
    assert spec["MountPoints"] == [
        {"ContainerPath": RECOVERY_MOUNT, "ReadOnly": False, "SourceVolume": "recovery"}
    ]
    env = env_of(dev.template, "processor")
    assert env["TRADE_STORE_RECOVERY_DIR"] == RECOVERY_DIR
    assert RECOVERY_DIR.startswith(RECOVERY_MOUNT + "/")
    fs_id, fs = only(dev.template, "AWS::EFS::FileSystem")
    ap_id, _ = only(dev.template, "AWS::EFS::AccessPoint")
    assert fs["Properties"]["Encrypted"] is True
    assert {
        "Effect": "Deny",
        "Principal": {"AWS": "*"},
        "Action": "*",
        "Condition": {"Bool": {"aws:SecureTransport": "false"}},
    } in fs["Properties"]["FileSystemPolicy"]["Statement"]
    volumes = task_definition_of(dev.template, "processor")["Volumes"]
    assert volumes == [
        {
            "Name": "recovery",
            "EFSVolumeConfiguration": {
                "FilesystemId": {"Ref": fs_id},
                "TransitEncryption": "ENABLED",
                "AuthorizationConfig": {"AccessPointId": {"Ref": ap_id}, "IAM": "ENABLED"},
            },
        }
    ]
    # Only the processor mounts it.
    for name in ("api", "migrate"):
        assert "MountPoints" not in container(dev.template, name)
    processor = service(dev.template, "ProcessorService")
    mount_targets = resources(dev.template, "AWS::EFS::MountTarget")
    assert set(mount_targets) <= set(processor["DependsOn"])


def test_migration_task_and_it_runs_before_the_services(dev: Synthesised) -> None:
    assert container(dev.template, "migrate")["Command"] == ["trade-store", "migrate"]
    migrate_td = logical_id(dev.template, "AWS::ECS::TaskDefinition", "MigrateTask")
    migration_id, migration = only(dev.template, "Custom::TradeStoreMigration")
    assert migration["Properties"]["TaskDefinition"] == {"Ref": migrate_td}
    assert migration["Properties"]["ContainerName"] == "migrate"
    for prefix in ("ApiService", "ProcessorService"):
        assert migration_id in service(dev.template, prefix)["DependsOn"]
    outputs = dev.template.find_outputs("MigrateCommand")
    assert "aws ecs run-task" in json.dumps(outputs)


# --- IAM -------------------------------------------------------------------------------


def test_dynamodb_access_is_scoped_to_the_status_table(dev: Synthesised) -> None:
    arns = [table_arn(dev.template), index_arn(dev.template)]
    dynamo = [
        (policy, s)
        for policy, s in statements(dev.template)
        if any(str(a).startswith("dynamodb:") for a in as_list(s["Action"]))
    ]
    assert {policy.split("Task")[0] for policy, _ in dynamo} == {"Api", "Processor", "Migrate"}
    for _, statement in dynamo:
        assert statement["Resource"] == arns
        assert "dynamodb:*" not in as_list(statement["Action"])
        assert "Condition" not in statement
    api = next(s for p, s in dynamo if p.startswith("ApiTaskTaskRole"))
    assert sorted(as_list(api["Action"])) == sorted(API_TABLE_ACTIONS)
    processor = next(s for p, s in dynamo if p.startswith("ProcessorTaskTaskRole"))
    assert sorted(as_list(processor["Action"])) == [
        "dynamodb:BatchGetItem",
        "dynamodb:BatchWriteItem",
        "dynamodb:UpdateItem",
    ]


def test_no_task_role_has_wildcard_resources(dev: Synthesised) -> None:
    for policy, statement in statements(dev.template):
        if "TaskTaskRole" in policy:
            assert statement["Resource"] != "*", policy
            assert "*" not in json.dumps(as_list(statement["Action"])), policy


def test_efs_access_is_limited_to_the_access_point(dev: Synthesised) -> None:
    fs_id, _ = only(dev.template, "AWS::EFS::FileSystem")
    efs = [
        (p, s)
        for p, s in statements(dev.template)
        if any(str(a).startswith("elasticfilesystem:") for a in as_list(s["Action"]))
    ]
    assert [p.split("Task")[0] for p, _ in efs] == ["Processor"]
    _, statement = efs[0]
    assert statement["Resource"] == {"Fn::GetAtt": [fs_id, "Arn"]}
    assert "elasticfilesystem:AccessPointArn" in statement["Condition"]["StringEquals"]
    assert "elasticfilesystem:ClientRootAccess" not in statement["Action"]


# --- the image asset ---------------------------------------------------------------------


def test_image_asset_is_the_repo_root_without_local_state(dev: Synthesised) -> None:
    staged = [d for d in dev.assembly_dir.glob("asset.*") if (d / "Dockerfile").is_file()]
    assert len(staged) == 1, staged
    root = staged[0]
    for name in ("pyproject.toml", "uv.lock", "README.md", "cli", "config"):
        assert (root / name).exists(), name
    for name in (".git", ".venv", ".services", "data", "infra", ".mypy_cache"):
        assert not (root / name).exists(), name
    assert not list(root.rglob("__pycache__"))


# --- parameters --------------------------------------------------------------------------


def test_prod_parameters(prod: Synthesised) -> None:
    t = prod.template
    t.has_resource_properties(
        "AWS::RDS::DBInstance",
        {"DBInstanceClass": "db.r6g.large", "MultiAZ": True, "DeletionProtection": True},
    )
    t.has_resource(
        "AWS::DynamoDB::Table",
        {
            "DeletionPolicy": "Retain",
            "Properties": Match.object_like({"DeletionProtectionEnabled": True}),
        },
    )
    t.has_resource("AWS::MSK::Cluster", {"DeletionPolicy": "Retain"})
    t.has_resource("AWS::EFS::FileSystem", {"DeletionPolicy": "Retain"})
    t.resource_count_is("AWS::EC2::NatGateway", 3)
    assert service(t, "ProcessorService")["Properties"]["DesiredCount"] == 0
    t.has_resource_properties(
        "AWS::ApplicationAutoScaling::ScalableTarget", {"MinCapacity": 3, "MaxCapacity": 12}
    )
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::LoadBalancer", {"Scheme": "internet-facing"}
    )
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {"Port": 443, "Protocol": "HTTPS", "Certificates": [{"CertificateArn": CERTIFICATE_ARN}]},
    )
    t.has_resource_properties(
        "AWS::ElasticLoadBalancingV2::Listener",
        {"Port": 80, "DefaultActions": [Match.object_like({"Type": "redirect"})]},
    )
    t.resource_count_is("Custom::TradeStoreMigration", 0)
    # An environment-specific stack still spans three zones without a context lookup.
    _, cluster = only(t, "AWS::MSK::Cluster")
    assert len(cluster["Properties"]["BrokerNodeGroupInfo"]["ClientSubnets"]) == 3
    assert env_of(t, "api")["TRADE_STORE_AWS_REGION"] == "eu-west-1"


# --- authentication ------------------------------------------------------------------------


def test_the_api_reads_its_key_file_from_a_secret_by_default(dev: Synthesised) -> None:
    api = container(dev.template, "api")
    env = env_of(dev.template, "api")
    assert (env["TRADE_STORE_AUTH"], env["TRADE_STORE_API_KEYS_FILE"]) == ("api-key", API_KEYS_FILE)
    assert api["Command"] == API_KEYS_COMMAND
    secret_id = logical_id(dev.template, "AWS::SecretsManager::Secret", "ApiKeys")
    assert {s["Name"]: s["ValueFrom"] for s in api["Secrets"]}["API_KEYS"] == {"Ref": secret_id}
    placeholder = resources(dev.template, "AWS::SecretsManager::Secret")[secret_id]
    assert all(
        line.startswith("#") for line in placeholder["Properties"]["SecretString"].splitlines()
    )  # no client gets in until keys are put there
    # Only the API holds the keys, and its execution role may read that secret.
    for name in ("processor", "migrate"):
        assert "TRADE_STORE_AUTH" not in env_of(dev.template, name)
        assert "API_KEYS" not in {s["Name"] for s in container(dev.template, name)["Secrets"]}
    assert any(
        "secretsmanager:GetSecretValue" in as_list(st["Action"])
        and {"Ref": secret_id} in as_list(st["Resource"])
        for _, st in statements(dev.template)
    )
    assert "ApiKeysSecretArn" in dev.template.to_json()["Outputs"]


def test_an_existing_key_secret_or_jwt_settings_from_parameters(tmp_path: Path) -> None:

    arn = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:trade-store-keys-AbCdEf"
    given = synthesise(tmp_path / "keys", api_keys_secret_arn=arn)
    assert "ApiKeys" not in "".join(resources(given.template, "AWS::SecretsManager::Secret"))
    secrets = {s["Name"]: s["ValueFrom"] for s in container(given.template, "api")["Secrets"]}
    assert secrets["API_KEYS"] == arn

    jwt = synthesise(
        tmp_path / "jwt",
        auth="jwt",
        jwt_issuer="https://idp.example/",
        jwt_audience="trade-store",
        jwt_jwks_url="https://idp.example/.well-known/jwks.json",
    )
    env = env_of(jwt.template, "api")
    assert env["TRADE_STORE_AUTH"] == "jwt"
    assert env["TRADE_STORE_JWT_ISSUER"] == "https://idp.example/"
    assert env["TRADE_STORE_JWT_AUDIENCE"] == "trade-store"
    assert env["TRADE_STORE_JWT_JWKS_URL"] == "https://idp.example/.well-known/jwks.json"
    assert container(jwt.template, "api")["Command"] == ["trade-store", "serve"]
    assert "API_KEYS" not in {s["Name"] for s in container(jwt.template, "api")["Secrets"]}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"auth": "none"}, "auth must be api-key or jwt"),
        ({"auth": "jwt", "jwt_issuer": "https://idp/"}, "auth jwt needs"),
        ({"processor_count": 2}, "processor_count must be 0 or 1"),
        ({"api_min_tasks": 4, "api_max_tasks": 2}, "api_min_tasks"),
        ({"api_min_tasks": 0}, "api_min_tasks"),
        ({"processor_workers": 0}, "processor_workers"),
    ],
)
def test_invalid_parameters_are_refused(params: dict[str, Any], message: str) -> None:
    import aws_cdk as cdk

    with pytest.raises(ValueError, match=message):
        TradeStoreStack(cdk.App(), "Invalid", **params)


def test_synthesis_has_no_warnings_or_errors(dev: Synthesised, prod: Synthesised) -> None:
    for synthesised in (dev, prod):
        annotations = Annotations.from_stack(synthesised.stack)
        assert annotations.find_warning("*", Match.any_value()) == []
        assert annotations.find_error("*", Match.any_value()) == []
