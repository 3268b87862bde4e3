"""The services profile on AWS: MSK, RDS PostgreSQL Multi-AZ, DynamoDB, ECS Fargate.

One stack, one VPC over three availability zones:

- public subnets: the NAT gateway(s) and, when internet-facing, the load balancer;
- private subnets (egress through NAT): the three MSK brokers, the ECS tasks, EFS;
- isolated subnets: RDS PostgreSQL (Multi-AZ).

Every container runs the image built from the repository's ``Dockerfile`` with
``TRADE_STORE_PROFILE=services``; only the command differs (``serve``, ``process``,
``migrate``). Settings are the ``TRADE_STORE_*`` variables of ``config/settings.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aws_cdk import (
    Arn,
    ArnComponents,
    ArnFormat,
    CfnOutput,
    CustomResource,
    Duration,
    Fn,
    IgnoreMode,
    RemovalPolicy,
    SecretValue,
    Stack,
)
from aws_cdk import aws_certificatemanager as acm
from aws_cdk import aws_dynamodb as dynamodb
from aws_cdk import aws_ec2 as ec2
from aws_cdk import aws_ecr_assets as ecr_assets
from aws_cdk import aws_ecs as ecs
from aws_cdk import aws_efs as efs
from aws_cdk import aws_elasticloadbalancingv2 as elbv2
from aws_cdk import aws_iam as iam
from aws_cdk import aws_lambda as lambda_
from aws_cdk import aws_logs as logs
from aws_cdk import aws_msk as msk
from aws_cdk import aws_rds as rds
from aws_cdk import aws_secretsmanager as secretsmanager
from aws_cdk import custom_resources as cr
from constructs import Construct

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER_DIR = Path(__file__).resolve().parent / "migration_runner"

API_PORT = 8000
HEALTH_CHECK_PATH = "/api/v1/health/live"  # liveness: a dependency outage must not kill tasks
KAFKA_PLAINTEXT_PORT = 9092
AZ_COUNT = 3
KAFKA_BROKERS = 3
DB_NAME = "trade_store"
DB_USER = "trade_store"
RECOVERY_MOUNT = "/var/lib/trade-store"
RECOVERY_DIR = f"{RECOVERY_MOUNT}/recovery"
API_KEYS_FILE = "/etc/trade-store/api-keys"  # the Dockerfile makes its folder, for uid 10001
# ECS injects a secret as an environment variable, not a file: the API's command writes the
# key file from it (0600, in the container only) before it starts the server.
API_KEYS_VARIABLE = "API_KEYS"
API_KEYS_COMMAND = [
    "sh",
    "-c",
    f'umask 077 && printf \'%s\\n\' "${API_KEYS_VARIABLE}" > "$TRADE_STORE_API_KEYS_FILE"'
    f" && unset {API_KEYS_VARIABLE} && exec trade-store serve",
]
API_KEYS_PLACEHOLDER = (
    "# trade-store API keys, one line per key (README: Authentication); put lines made by\n"
    "# `trade-store keys add` here, then redeploy the API service.\n"
)

# Only what the Dockerfile needs is hashed and sent to the build: no virtualenvs, service
# data, caches, git history, nor this CDK app (whose cdk.out would contain the repo again).
IMAGE_EXCLUDES = [
    ".git",
    ".venv",
    ".services",
    "data",
    "infra",
    "bench/results",
    ".mypy_cache",
    ".pytest_cache",
    ".ruff_cache",
    ".hypothesis",
    ".coverage",
    ".coverage.*",
    ".env",
    "**/__pycache__",
    "**/*.pyc",
    "**/node_modules",
]

# The generated password goes verbatim into a URL; keep it to letters, digits, '-', '_', '.'.
URL_UNSAFE_CHARACTERS = " !\"#$%&'()*+,/:;<=>?@[\\]^`{|}~"

# DynamoDB calls made by adapters/dynamodb.py, per role (nothing else, and only on the table).
API_TABLE_ACTIONS = [
    "dynamodb:BatchGetItem",  # GET /api/v1/requests?ids= (get_many)
    "dynamodb:BatchWriteItem",  # PENDING records (put_pending)
    # withdraw a PENDING record when queueing fails; health's write probe (a reserved key)
    "dynamodb:DeleteItem",
    "dynamodb:GetItem",  # GET /api/v1/requests/{id}, a batch record
    "dynamodb:PutItem",  # a batch record (put_batch)
    "dynamodb:Query",  # a batch's items, on the batch_items index (batch, batch_items)
]
PROCESSOR_TABLE_ACTIONS = [
    "dynamodb:BatchGetItem",  # which outcomes' records are terminal already (complete)
    "dynamodb:BatchWriteItem",  # outcomes (complete)
    "dynamodb:UpdateItem",  # dead letters: PENDING -> FAILED only (fail_pending)
]
MIGRATE_TABLE_ACTIONS = [
    # ensure_table(): CreateTable answers ResourceInUseException for the CDK-made table.
    "dynamodb:CreateTable",
    "dynamodb:DescribeTable",
    "dynamodb:UpdateTable",  # adds the batch_items index to a table made before it
    "dynamodb:UpdateTimeToLive",
]
# The status table's sparse index of batch items (adapters/dynamodb.py BATCH_INDEX).
BATCH_INDEX = "batch_items"

# MSK broker settings for "ack means durable": acks=all waits for 2 of 3 replicas, and an
# out-of-sync replica never becomes leader. Topics are created by `trade-store process`.
KAFKA_SERVER_PROPERTIES = "\n".join(
    [
        "auto.create.topics.enable=false",
        "default.replication.factor=3",
        "min.insync.replicas=2",
        "unclean.leader.election.enable=false",
        "",
    ]
)


class TradeStoreStack(Stack):
    """The whole services profile of trade-store in one stack.

    Parameters (app.py reads them from CDK context):

    - ``env_name``: suffix of names; ``prod`` also retains the data stores on deletion,
      turns on deletion protection and runs one NAT gateway per zone.
    - ``processor_count``: processor tasks, 0 (paused) or 1. The Bytewax Kafka source
      assigns partitions itself (no consumer group) and the recovery store takes one
      writer, so independent copies would each read every partition; scale with
      ``processor_workers`` (Bytewax workers in the task) and Kafka partitions instead.
    - ``api_min_tasks`` / ``api_max_tasks``: bounds of the API's CPU autoscaling.
    - ``db_instance_type``: RDS instance class without the ``db.`` prefix (``t4g.medium``).
    - ``internet_facing`` / ``certificate_arn``: the ALB's scheme; HTTPS when a certificate
      is given (port 80 then redirects).
    - ``run_migrations``: run the migrate task on every deployment, before the services.
    - ``auth``: how the API authenticates its clients, ``api-key`` (the key file's content
      from a Secrets Manager secret: ``api_keys_secret_arn``, or one the stack creates) or
      ``jwt`` (``jwt_issuer``, ``jwt_audience`` and ``jwt_jwks_url`` required). Never
      ``none``: the load balancer may face the internet.
    """

    def __init__(
        self,
        scope: Construct,
        construct_id: str,
        *,
        env_name: str = "dev",
        processor_count: int = 1,
        processor_workers: int = 2,
        api_min_tasks: int = 2,
        api_max_tasks: int = 6,
        db_instance_type: str = "t4g.medium",
        kafka_instance_type: str = "kafka.m7g.large",
        kafka_version: str = "3.9.x.kraft",
        internet_facing: bool = False,
        certificate_arn: str | None = None,
        run_migrations: bool = True,
        image_directory: Path = REPO_ROOT,
        auth: str = "api-key",
        api_keys_secret_arn: str | None = None,
        jwt_issuer: str | None = None,
        jwt_audience: str | None = None,
        jwt_jwks_url: str | None = None,
        **kwargs: Any,
    ) -> None:
        if processor_count not in (0, 1):
            raise ValueError(
                f"processor_count must be 0 or 1, not {processor_count}: independent "
                "Bytewax processes would each read every partition and share one recovery "
                "store; raise processor_workers (and Kafka partitions) instead"
            )
        if not 1 <= api_min_tasks <= api_max_tasks:
            raise ValueError(f"need 1 <= api_min_tasks ({api_min_tasks}) <= api_max_tasks")
        if processor_workers < 1:
            raise ValueError("processor_workers must be at least 1")
        if auth not in ("api-key", "jwt"):
            raise ValueError(f"auth must be api-key or jwt, not {auth!r}")
        if auth == "jwt" and not (jwt_issuer and jwt_audience and jwt_jwks_url):
            raise ValueError("auth jwt needs jwt_issuer, jwt_audience and jwt_jwks_url")
        super().__init__(scope, construct_id, **kwargs)
        self.env_name = env_name
        self.prod = env_name == "prod"
        self.retain = RemovalPolicy.RETAIN if self.prod else RemovalPolicy.DESTROY

        self._network()
        self._kafka(kafka_instance_type, kafka_version)
        self._database(db_instance_type)
        self._status_table()
        self._recovery_volume()
        if auth == "api-key":
            self._api_keys(api_keys_secret_arn)
        else:
            self.api_keys = None
            self.api_auth_env = {
                "TRADE_STORE_AUTH": "jwt",
                "TRADE_STORE_JWT_ISSUER": str(jwt_issuer),
                "TRADE_STORE_JWT_AUDIENCE": str(jwt_audience),
                "TRADE_STORE_JWT_JWKS_URL": str(jwt_jwks_url),
            }
        self._task_definitions(image_directory, processor_workers)
        self._services(processor_count, api_min_tasks, api_max_tasks)
        self._load_balancer(internet_facing, certificate_arn)
        if run_migrations:
            migration = self._migration_runner()
            self.api_service.node.add_dependency(migration)
            self.processor_service.node.add_dependency(migration)
        self._outputs("https" if certificate_arn else "http")

    # --- network ---------------------------------------------------------------------

    def _network(self) -> None:
        # Three zones resolved at deploy time (no context lookup, so synth works offline);
        # MSK needs its broker count to be a multiple of its client subnets.
        self.vpc = ec2.Vpc(
            self,
            "Vpc",
            availability_zones=[Fn.select(i, Fn.get_azs()) for i in range(AZ_COUNT)],
            nat_gateways=AZ_COUNT if self.prod else 1,
            subnet_configuration=[
                ec2.SubnetConfiguration(
                    name="public", subnet_type=ec2.SubnetType.PUBLIC, cidr_mask=24
                ),
                ec2.SubnetConfiguration(
                    name="private", subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS, cidr_mask=20
                ),
                ec2.SubnetConfiguration(
                    name="data", subnet_type=ec2.SubnetType.PRIVATE_ISOLATED, cidr_mask=24
                ),
            ],
        )
        # Status writes are the busiest AWS API calls: keep them (and ECR layers) off NAT.
        self.vpc.add_gateway_endpoint(
            "DynamoDbEndpoint", service=ec2.GatewayVpcEndpointAwsService.DYNAMODB
        )
        self.vpc.add_gateway_endpoint("S3Endpoint", service=ec2.GatewayVpcEndpointAwsService.S3)
        self.private = ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS)
        self.private_subnet_ids = self.vpc.select_subnets(
            subnet_type=ec2.SubnetType.PRIVATE_WITH_EGRESS
        ).subnet_ids

        def security_group(name: str, description: str) -> ec2.SecurityGroup:
            return ec2.SecurityGroup(
                self, name, vpc=self.vpc, description=description, allow_all_outbound=True
            )

        self.api_sg = security_group("ApiSg", "trade-store API tasks")
        self.processor_sg = security_group("ProcessorSg", "trade-store processor tasks")
        self.migrate_sg = security_group("MigrateSg", "trade-store migration task")
        self.kafka_sg = security_group("KafkaSg", "trade-store MSK brokers")
        self.db_sg = security_group("DatabaseSg", "trade-store PostgreSQL")
        self.efs_sg = security_group("RecoveryFsSg", "trade-store Bytewax recovery EFS")
        for client, name in ((self.api_sg, "API"), (self.processor_sg, "processor")):
            self.kafka_sg.add_ingress_rule(
                client, ec2.Port.tcp(KAFKA_PLAINTEXT_PORT), f"Kafka from the {name}"
            )
        for client, name in (
            (self.api_sg, "API"),
            (self.processor_sg, "processor"),
            (self.migrate_sg, "migration"),
        ):
            self.db_sg.add_ingress_rule(client, ec2.Port.tcp(5432), f"PostgreSQL from the {name}")
        self.efs_sg.add_ingress_rule(self.processor_sg, ec2.Port.tcp(2049), "NFS from processor")

    # --- Kafka (MSK, provisioned) --------------------------------------------------------

    def _kafka(self, instance_type: str, version: str) -> None:
        broker_logs = logs.LogGroup(
            self,
            "KafkaBrokerLogs",
            retention=logs.RetentionDays.ONE_MONTH,
            removal_policy=self.retain,
        )
        config = msk.CfnConfiguration(
            self,
            "KafkaConfig",
            name=f"trade-store-{self.env_name}",
            description="trade-store: durable acks=all, no unclean leader election",
            server_properties=KAFKA_SERVER_PROPERTIES,
        )
        self.kafka = msk.CfnCluster(
            self,
            "Kafka",
            cluster_name=f"trade-store-{self.env_name}",
            kafka_version=version,
            number_of_broker_nodes=KAFKA_BROKERS,
            broker_node_group_info=msk.CfnCluster.BrokerNodeGroupInfoProperty(
                client_subnets=self.private_subnet_ids,
                instance_type=instance_type,
                security_groups=[self.kafka_sg.security_group_id],
                storage_info=msk.CfnCluster.StorageInfoProperty(
                    ebs_storage_info=msk.CfnCluster.EBSStorageInfoProperty(volume_size=100)
                ),
            ),
            # The application's clients (confluent-kafka, Bytewax) speak PLAINTEXT inside
            # the VPC; access is by security group. Broker-to-broker traffic is TLS.
            client_authentication=msk.CfnCluster.ClientAuthenticationProperty(
                unauthenticated=msk.CfnCluster.UnauthenticatedProperty(enabled=True)
            ),
            encryption_info=msk.CfnCluster.EncryptionInfoProperty(
                encryption_in_transit=msk.CfnCluster.EncryptionInTransitProperty(
                    client_broker="PLAINTEXT", in_cluster=True
                )
            ),
            configuration_info=msk.CfnCluster.ConfigurationInfoProperty(
                arn=config.attr_arn, revision=config.attr_latest_revision_revision
            ),
            enhanced_monitoring="PER_BROKER" if self.prod else "DEFAULT",
            logging_info=msk.CfnCluster.LoggingInfoProperty(
                broker_logs=msk.CfnCluster.BrokerLogsProperty(
                    cloud_watch_logs=msk.CfnCluster.CloudWatchLogsProperty(
                        enabled=True, log_group=broker_logs.log_group_name
                    )
                )
            ),
        )
        self.kafka.apply_removal_policy(self.retain)
        # CloudFormation exposes no bootstrap string for AWS::MSK::Cluster: ask MSK's API.
        brokers = cr.AwsCustomResource(
            self,
            "KafkaBootstrapBrokers",
            on_update=cr.AwsSdkCall(
                service="Kafka",
                action="getBootstrapBrokers",
                parameters={"ClusterArn": self.kafka.attr_arn},
                physical_resource_id=cr.PhysicalResourceId.of(self.kafka.attr_arn),
            ),
            policy=cr.AwsCustomResourcePolicy.from_sdk_calls(resources=[self.kafka.attr_arn]),
            install_latest_aws_sdk=False,
        )
        self.bootstrap_servers = brokers.get_response_field("BootstrapBrokerString")

    # --- PostgreSQL (RDS Multi-AZ) -------------------------------------------------------

    def _database(self, instance_type: str) -> None:
        self.database = rds.DatabaseInstance(
            self,
            "Database",
            engine=rds.DatabaseInstanceEngine.postgres(version=rds.PostgresEngineVersion.VER_16),
            instance_type=ec2.InstanceType(instance_type),
            vpc=self.vpc,
            vpc_subnets=ec2.SubnetSelection(subnet_type=ec2.SubnetType.PRIVATE_ISOLATED),
            security_groups=[self.db_sg],
            multi_az=True,
            database_name=DB_NAME,
            credentials=rds.Credentials.from_generated_secret(
                DB_USER, exclude_characters=URL_UNSAFE_CHARACTERS
            ),
            storage_type=rds.StorageType.GP3,
            allocated_storage=50,
            max_allocated_storage=500,
            storage_encrypted=True,
            backup_retention=Duration.days(7),
            cloudwatch_logs_exports=["postgresql"],
            cloudwatch_logs_retention=logs.RetentionDays.ONE_MONTH,
            deletion_protection=self.prod,
            removal_policy=RemovalPolicy.SNAPSHOT,
        )
        assert self.database.secret is not None
        # TRADE_STORE_DATABASE_URL as one secret. CloudFormation composes it from a dynamic
        # reference to the generated password ({{resolve:secretsmanager:...}}): no password
        # in the template, and the containers get it as an ordinary ECS secret.
        password = self.database.secret.secret_value_from_json("password").unsafe_unwrap()
        self.database_url = secretsmanager.Secret(
            self,
            "DatabaseUrl",
            description="TRADE_STORE_DATABASE_URL for trade-store (composed from the RDS secret)",
            secret_string_value=SecretValue.unsafe_plain_text(
                f"postgresql+psycopg://{DB_USER}:{password}"
                f"@{self.database.db_instance_endpoint_address}"
                f":{self.database.db_instance_endpoint_port}/{DB_NAME}?sslmode=require"
            ),
        )

    # --- DynamoDB status table -----------------------------------------------------------

    def _status_table(self) -> None:
        self.status_table = dynamodb.Table(
            self,
            "StatusTable",
            partition_key=dynamodb.Attribute(name="request_id", type=dynamodb.AttributeType.STRING),
            billing_mode=dynamodb.BillingMode.PAY_PER_REQUEST,
            time_to_live_attribute="expires_at",
            point_in_time_recovery_specification=dynamodb.PointInTimeRecoverySpecification(
                point_in_time_recovery_enabled=True
            ),
            encryption=dynamodb.TableEncryption.AWS_MANAGED,
            deletion_protection=self.prod,
            removal_policy=self.retain,
        )
        self.status_table.add_global_secondary_index(
            index_name=BATCH_INDEX,
            partition_key=dynamodb.Attribute(name="batch_id", type=dynamodb.AttributeType.STRING),
            sort_key=dynamodb.Attribute(name="batch_index", type=dynamodb.AttributeType.NUMBER),
            projection_type=dynamodb.ProjectionType.ALL,
        )

    # --- EFS for Bytewax recovery snapshots ----------------------------------------------

    def _recovery_volume(self) -> None:
        self.recovery_fs = efs.FileSystem(
            self,
            "RecoveryFs",
            vpc=self.vpc,
            vpc_subnets=self.private,
            security_group=self.efs_sg,
            encrypted=True,
            performance_mode=efs.PerformanceMode.GENERAL_PURPOSE,
            throughput_mode=efs.ThroughputMode.ELASTIC,
            enable_automatic_backups=True,
            removal_policy=self.retain,
        )
        # NFS only over TLS (the task mounts with transit encryption on).
        self.recovery_fs.add_to_resource_policy(
            iam.PolicyStatement(
                effect=iam.Effect.DENY,
                principals=[iam.AnyPrincipal()],
                actions=["*"],
                conditions={"Bool": {"aws:SecureTransport": "false"}},
            )
        )
        self.recovery_ap = self.recovery_fs.add_access_point(
            "RecoveryAccessPoint",
            path="/recovery",
            create_acl=efs.Acl(owner_uid="1000", owner_gid="1000", permissions="750"),
            posix_user=efs.PosixUser(uid="1000", gid="1000"),
        )

    # --- API keys --------------------------------------------------------------------------

    def _api_keys(self, secret_arn: str | None) -> None:
        """The key file's content in Secrets Manager: the given secret, or a new one holding
        only a comment (no client gets in until keys are put there)."""
        self.api_keys: secretsmanager.ISecret | None = (
            secretsmanager.Secret.from_secret_complete_arn(self, "ApiKeys", secret_arn)
            if secret_arn
            else secretsmanager.Secret(
                self,
                "ApiKeys",
                description="TRADE_STORE_API_KEYS_FILE content for trade-store's API",
                secret_string_value=SecretValue.unsafe_plain_text(API_KEYS_PLACEHOLDER),
            )
        )
        self.api_auth_env = {
            "TRADE_STORE_AUTH": "api-key",
            "TRADE_STORE_API_KEYS_FILE": API_KEYS_FILE,
        }

    # --- ECS task definitions ------------------------------------------------------------

    def _task_definitions(self, image_directory: Path, processor_workers: int) -> None:
        self.cluster = ecs.Cluster(
            self, "Cluster", vpc=self.vpc, container_insights_v2=ecs.ContainerInsights.ENABLED
        )
        image = ecs.ContainerImage.from_asset(
            str(image_directory),
            exclude=IMAGE_EXCLUDES,
            ignore_mode=IgnoreMode.DOCKER,
            platform=ecr_assets.Platform.LINUX_AMD64,
        )
        environment = {
            "TRADE_STORE_PROFILE": "services",
            "TRADE_STORE_KAFKA_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "TRADE_STORE_REPLICATION_FACTOR": str(KAFKA_BROKERS),
            "TRADE_STORE_STATUS_TABLE": self.status_table.table_name,
            "TRADE_STORE_AWS_REGION": self.region,
            "TRADE_STORE_LOG_FORMAT": "json",
        }
        secrets = {"TRADE_STORE_DATABASE_URL": ecs.Secret.from_secrets_manager(self.database_url)}

        def task_definition(
            role: str,
            cpu: int,
            memory: int,
            command: list[str],
            table_actions: list[str],
            extra_env: dict[str, str],
            **container_options: Any,
        ) -> tuple[ecs.FargateTaskDefinition, ecs.ContainerDefinition]:
            definition = ecs.FargateTaskDefinition(
                self,
                f"{role.capitalize()}Task",
                family=f"trade-store-{self.env_name}-{role}",
                cpu=cpu,
                memory_limit_mib=memory,
                runtime_platform=ecs.RuntimePlatform(
                    cpu_architecture=ecs.CpuArchitecture.X86_64,
                    operating_system_family=ecs.OperatingSystemFamily.LINUX,
                ),
            )
            log_group = logs.LogGroup(
                self,
                f"{role.capitalize()}Logs",
                retention=logs.RetentionDays.ONE_MONTH,
                removal_policy=RemovalPolicy.DESTROY,
            )
            container = definition.add_container(
                role,
                image=image,
                command=command,
                environment={**environment, **extra_env},
                secrets=secrets,
                logging=ecs.LogDriver.aws_logs(stream_prefix=role, log_group=log_group),
                **container_options,
            )
            # This role's calls on the status table, on that table (and its index) only.
            table = self.status_table.table_arn
            definition.add_to_task_role_policy(
                iam.PolicyStatement(
                    actions=table_actions, resources=[table, f"{table}/index/{BATCH_INDEX}"]
                )
            )
            return definition, container

        # API: uvicorn, two worker processes per task, behind the authentication chosen.
        self.api_task, api = task_definition(
            "api",
            1024,
            2048,
            API_KEYS_COMMAND if self.api_keys else ["trade-store", "serve"],
            API_TABLE_ACTIONS,
            {
                "TRADE_STORE_API_WORKERS": "2",
                # The load balancer, inside the VPC, forwards the client's address.
                "TRADE_STORE_TRUSTED_PROXIES": self.vpc.vpc_cidr_block,
                **self.api_auth_env,
            },
        )
        api.add_port_mappings(ecs.PortMapping(container_port=API_PORT))
        if self.api_keys:
            api.add_secret(API_KEYS_VARIABLE, ecs.Secret.from_secrets_manager(self.api_keys))

        # Processor: the Bytewax dataflow; recovery snapshots on EFS outlive the task.
        self.processor_task, processor = task_definition(
            "processor",
            2048,
            4096,
            ["trade-store", "process"],
            PROCESSOR_TABLE_ACTIONS,
            {
                "TRADE_STORE_RECOVERY_DIR": RECOVERY_DIR,
                "TRADE_STORE_PROCESSOR_WORKERS": str(processor_workers),
            },
            # SIGTERM, then up to Fargate's maximum for Bytewax to close its epoch.
            stop_timeout=Duration.seconds(120),
        )
        self.processor_task.add_volume(
            name="recovery",
            efs_volume_configuration=ecs.EfsVolumeConfiguration(
                file_system_id=self.recovery_fs.file_system_id,
                transit_encryption="ENABLED",
                authorization_config=ecs.AuthorizationConfig(
                    access_point_id=self.recovery_ap.access_point_id, iam="ENABLED"
                ),
            ),
        )
        processor.add_mount_points(
            ecs.MountPoint(container_path=RECOVERY_MOUNT, source_volume="recovery", read_only=False)
        )
        self.processor_task.add_to_task_role_policy(
            iam.PolicyStatement(
                actions=["elasticfilesystem:ClientMount", "elasticfilesystem:ClientWrite"],
                resources=[self.recovery_fs.file_system_arn],
                conditions={
                    "StringEquals": {
                        "elasticfilesystem:AccessPointArn": self.recovery_ap.access_point_arn
                    }
                },
            )
        )

        # Migration: one-off `trade-store migrate` (Alembic to head; checks the table).
        self.migrate_task, _ = task_definition(
            "migrate", 512, 1024, ["trade-store", "migrate"], MIGRATE_TABLE_ACTIONS, {}
        )

    # --- ECS services --------------------------------------------------------------------

    def _services(self, processor_count: int, api_min_tasks: int, api_max_tasks: int) -> None:
        # No desired count: autoscaling owns it, and a deployment must not reset it.
        self.api_service = ecs.FargateService(
            self,
            "ApiService",
            cluster=self.cluster,
            task_definition=self.api_task,
            vpc_subnets=self.private,
            security_groups=[self.api_sg],
            min_healthy_percent=100,
            max_healthy_percent=200,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
            health_check_grace_period=Duration.seconds(60),
        )
        scaling = self.api_service.auto_scale_task_count(
            min_capacity=api_min_tasks, max_capacity=api_max_tasks
        )
        scaling.scale_on_cpu_utilization(
            "Cpu",
            target_utilization_percent=60,
            scale_in_cooldown=Duration.seconds(120),
            scale_out_cooldown=Duration.seconds(60),
        )

        # One processor at a time, also while deploying: the old task stops before the new
        # one starts and resumes from the snapshots on EFS.
        self.processor_service = ecs.FargateService(
            self,
            "ProcessorService",
            cluster=self.cluster,
            task_definition=self.processor_task,
            desired_count=processor_count,
            vpc_subnets=self.private,
            security_groups=[self.processor_sg],
            min_healthy_percent=0,
            max_healthy_percent=100,
            circuit_breaker=ecs.DeploymentCircuitBreaker(enable=True, rollback=True),
        )
        self.processor_service.node.add_dependency(self.recovery_fs.mount_targets_available)

    # --- load balancer -------------------------------------------------------------------

    def _load_balancer(self, internet_facing: bool, certificate_arn: str | None) -> None:
        self.load_balancer = elbv2.ApplicationLoadBalancer(
            self,
            "ApiLoadBalancer",
            vpc=self.vpc,
            internet_facing=internet_facing,
            vpc_subnets=(
                ec2.SubnetSelection(subnet_type=ec2.SubnetType.PUBLIC)
                if internet_facing
                else self.private
            ),
            drop_invalid_header_fields=True,
        )
        if certificate_arn:
            listener = self.load_balancer.add_listener(
                "Https",
                port=443,
                certificates=[acm.Certificate.from_certificate_arn(self, "Cert", certificate_arn)],
                ssl_policy=elbv2.SslPolicy.RECOMMENDED_TLS,
            )
            self.load_balancer.add_redirect()
        else:
            listener = self.load_balancer.add_listener("Http", port=80)
        listener.add_targets(
            "Api",
            port=API_PORT,
            protocol=elbv2.ApplicationProtocol.HTTP,
            targets=[
                self.api_service.load_balancer_target(container_name="api", container_port=API_PORT)
            ],
            health_check=elbv2.HealthCheck(
                path=HEALTH_CHECK_PATH,
                healthy_http_codes="200",
                interval=Duration.seconds(15),
                timeout=Duration.seconds(5),
                healthy_threshold_count=2,
                unhealthy_threshold_count=3,
            ),
            deregistration_delay=Duration.seconds(30),
        )

    # --- migrations on every deployment, before the services roll ------------------------

    def _migration_runner(self) -> CustomResource:
        """Run the migrate task and wait for it to exit 0 (see migration_runner/handler.py)."""

        def function(name: str, handler: str) -> lambda_.Function:
            return lambda_.Function(
                self,
                name,
                runtime=lambda_.Runtime.PYTHON_3_12,
                handler=handler,
                code=lambda_.Code.from_asset(str(RUNNER_DIR), exclude=["__pycache__", "*.pyc"]),
                timeout=Duration.seconds(30),
            )

        start = function("MigrationStart", "handler.on_event")
        check = function("MigrationCheck", "handler.is_complete")
        start.add_to_role_policy(
            iam.PolicyStatement(
                actions=["ecs:RunTask"],
                resources=[self.migrate_task.task_definition_arn],
                conditions={"ArnEquals": {"ecs:cluster": self.cluster.cluster_arn}},
            )
        )
        roles = [self.migrate_task.task_role, self.migrate_task.obtain_execution_role()]
        start.add_to_role_policy(
            iam.PolicyStatement(
                actions=["iam:PassRole"], resources=[role.role_arn for role in roles]
            )
        )
        tasks_arn = Arn.format(
            ArnComponents(
                service="ecs",
                resource="task",
                resource_name=f"{self.cluster.cluster_name}/*",
                arn_format=ArnFormat.SLASH_RESOURCE_NAME,
            ),
            self,
        )
        check.add_to_role_policy(
            iam.PolicyStatement(actions=["ecs:DescribeTasks"], resources=[tasks_arn])
        )
        provider = cr.Provider(
            self,
            "MigrationProvider",
            on_event_handler=start,
            is_complete_handler=check,
            query_interval=Duration.seconds(15),
            total_timeout=Duration.minutes(30),
        )
        migration = CustomResource(
            self,
            "Migration",
            service_token=provider.service_token,
            resource_type="Custom::TradeStoreMigration",
            properties={
                "Cluster": self.cluster.cluster_arn,
                "TaskDefinition": self.migrate_task.task_definition_arn,
                "ContainerName": "migrate",
                "Subnets": self.private_subnet_ids,
                "SecurityGroups": [self.migrate_sg.security_group_id],
            },
        )
        # The task starts once: its routes (NAT, DynamoDB endpoint) and its way into
        # PostgreSQL must exist by then.
        migration.node.add_dependency(self.vpc, self.db_sg)
        return migration

    # --- outputs -------------------------------------------------------------------------

    def _outputs(self, scheme: str) -> None:
        migrate_command = Fn.join(
            "",
            [
                "aws ecs run-task --launch-type FARGATE --cluster ",
                self.cluster.cluster_name,
                " --task-definition ",
                self.migrate_task.family,
                " --network-configuration 'awsvpcConfiguration={subnets=[",
                Fn.join(",", self.private_subnet_ids),
                "],securityGroups=[",
                self.migrate_sg.security_group_id,
                "],assignPublicIp=DISABLED}'",
            ],
        )
        CfnOutput(self, "ApiUrl", value=f"{scheme}://{self.load_balancer.load_balancer_dns_name}")
        CfnOutput(self, "KafkaBootstrapServers", value=self.bootstrap_servers)
        CfnOutput(self, "StatusTableName", value=self.status_table.table_name)
        CfnOutput(self, "DatabaseUrlSecretArn", value=self.database_url.secret_arn)
        if self.api_keys:
            CfnOutput(self, "ApiKeysSecretArn", value=self.api_keys.secret_arn)
        CfnOutput(self, "ClusterName", value=self.cluster.cluster_name)
        CfnOutput(self, "MigrateCommand", value=migrate_command)
