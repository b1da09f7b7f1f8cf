# The executor service (what trainers talk to) as a Nomad service job. With
# TOOL_EXECUTOR_BACKEND=nomad it registers and scales the sandbox pool job itself
# (nomad/sandbox.nomad.hcl is that job as a file). deploy/run-nomad.sh stores the secrets and
# runs this file; docs/operations.md says what the clients and the ACL token need.
#
# Secrets come from the Nomad Variable nomad/jobs/atropos-tool-executor, never from this file:
#   nomad_token        ACL token the executor uses (policy in docs/operations.md)
#   executor_token     bearer token trainers must send (TOOL_EXECUTOR_TOKEN)
#   tool_server_token  optional, for TOOL_EXECUTOR_TOOL_SERVER_URL
#
# More executors for more load: -var executors=N. Executor i (its allocation index) owns the
# sandbox pool job <sandbox_job_id>-<i> (TOOL_EXECUTOR_JOB_ID_PER_ALLOC), a replacement of it
# keeps the index and adopts that pool, and each registers in the service
# atropos-tool-executor. Trainers find them all through Nomad:
# ExecutorClient.from_nomad(service="atropos-tool-executor", ...) routes each trajectory to one
# executor and keeps it there (docs/operations.md, "More load: several executors").

variable "image" {
  type    = string
  default = "atropos-tool-executor:local"
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "namespace" {
  type        = string
  default     = "default"
  description = "Namespace of this job, its Variable and its sandbox pool (run-nomad.sh sets it from NOMAD_NAMESPACE)."
}

variable "executors" {
  type        = number
  default     = 1
  description = "Executors, each with a sandbox pool of its own."
}

variable "sandbox_job_id" {
  type        = string
  default     = "atropos-sandbox-tool-executor"
  description = "The sandbox pool jobs' prefix: executor i owns <sandbox_job_id>-<i>."
}

variable "sandbox_image" {
  type    = string
  default = "atropos-sandbox:local"
}

variable "sandbox_driver" {
  type        = string
  default     = "docker"
  description = "docker, or raw_exec on clients without Docker."
}

variable "sandbox_privileged" {
  type = bool
  # bubblewrap inside Docker needs a privileged container (docs/operations.md); the clients
  # must then set allow_privileged = true in their docker plugin block.
  default = true
}

variable "min_containers" {
  type    = number
  default = 1
}

variable "max_containers" {
  type    = number
  default = 10
}

variable "slots" {
  type    = number
  default = 10
}

job "atropos-tool-executor" {
  type        = "service"
  namespace   = var.namespace
  datacenters = var.datacenters

  group "executor" {
    # Each executor owns a pool of its own (<sandbox_job_id>-<alloc index>): leases live in
    # its memory, so no two executors share one.
    count = var.executors

    network {
      port "http" {
        to = 9001
      }
      # GET /metrics without auth, for Prometheus (TOOL_EXECUTOR_METRICS_PORT below).
      port "metrics" {
        to = 9102
      }
    }

    service {
      name     = "atropos-tool-executor"
      port     = "http"
      provider = "nomad"

      # 503 until at least one sandbox serves, so the check turns healthy once the pool is up.
      # Trainers' clients route new trajectories to the executors this service lists.
      check {
        name     = "executor-health"
        type     = "http"
        path     = "/health"
        interval = "10s"
        timeout  = "2s"
      }
    }

    # Where Prometheus finds the metrics (deploy/prometheus/prometheus.yml keeps this name).
    service {
      name     = "atropos-tool-executor-metrics"
      port     = "metrics"
      provider = "nomad"
      tags     = ["metrics"]
    }

    task "executor" {
      driver = "docker"

      config {
        image = var.image
        ports = ["http", "metrics"]
      }

      env {
        TOOL_EXECUTOR_BACKEND           = "nomad"
        TOOL_EXECUTOR_HOST              = "0.0.0.0"
        TOOL_EXECUTOR_PORT              = "9001"
        # The Nomad agent of the node this runs on (Nomad interpolates the attribute when it
        # places the task); the agent must listen on that address, not only on 127.0.0.1.
        # With TLS: https://, plus TOOL_EXECUTOR_NOMAD_CA_CERT.
        TOOL_EXECUTOR_NOMAD_ADDRESS     = "http://${attr.unique.network.ip-address}:4646"
        TOOL_EXECUTOR_JOB_ID            = var.sandbox_job_id
        TOOL_EXECUTOR_NOMAD_NAMESPACE   = var.namespace
        TOOL_EXECUTOR_IMAGE             = var.sandbox_image
        TOOL_EXECUTOR_NOMAD_DRIVER      = var.sandbox_driver
        TOOL_EXECUTOR_PRIVILEGED        = "${var.sandbox_privileged}"
        TOOL_EXECUTOR_MIN_CONTAINERS    = "${var.min_containers}"
        TOOL_EXECUTOR_MAX_CONTAINERS    = "${var.max_containers}"
        TOOL_EXECUTOR_SLOTS             = "${var.slots}"
        TOOL_EXECUTOR_NOMAD_DATACENTERS = jsonencode(var.datacenters)
        # The lease journal outlives a restart of this task in its allocation, so trainers of
        # the previous run are told their workspaces are gone (docs/executor.md).
        TOOL_EXECUTOR_STATE_DIR         = "${NOMAD_ALLOC_DIR}/state"
        # Metrics answer without a token on this port only (the service's port asks for one).
        TOOL_EXECUTOR_METRICS_HOST      = "0.0.0.0"
        TOOL_EXECUTOR_METRICS_PORT      = "9102"
      }

      # Tokens, rendered from this job's own Variable into the secrets directory and read back
      # as environment variables. The task reads nomad/jobs/<this job> through its workload
      # identity, so no policy is needed for it, and the tokens never show in the job spec.
      template {
        data        = <<-EOT
          {{ with nomadVar "nomad/jobs/atropos-tool-executor" }}
          NOMAD_TOKEN={{ .nomad_token }}
          TOOL_EXECUTOR_TOKEN={{ .executor_token }}
          {{ if .Keys | contains "tool_server_token" }}TOOL_EXECUTOR_TOOL_SERVER_TOKEN={{ .tool_server_token }}{{ end }}
          {{ end }}
        EOT
        destination = "secrets/executor.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = 1000
        memory = 1024
      }

      # On SIGTERM the executor answers calls in flight, removes its pool job
      # (TOOL_EXECUTOR_PURGE_JOB_ON_SHUTDOWN, default true) and exits within
      # TOOL_EXECUTOR_SHUTDOWN_TIMEOUT_S (4.5 s); this leaves it room (docs/operations.md).
      kill_timeout = "10s"
    }
  }
}
