# The sandbox pool as one Nomad job: N allocations of the sandbox server, S slots each.
#
# The executor (TOOL_EXECUTOR_BACKEND=nomad) registers this same job itself, built from its
# settings by atropos_agent/executor/backends/nomad_job.py; tests/test_nomad_job_files.py keeps the two
# in agreement for the default settings. This file is for reading and review, and for running
# a pool by hand:
#
#   nomad var put nomad/jobs/atropos-sandbox-tool-executor sandbox_token=@token-file
#   nomad job run -var image=registry.example/atropos-sandbox:1.0 nomad/sandbox.nomad.hcl
#
# An executor that finds a job it did not register (no atropos_spec_hash in its meta) replaces
# it with its own spec, so a pool run by hand is taken over when an executor starts.
# Hosts without Docker: nomad/sandbox-raw-exec.nomad.hcl. Operations: docs/operations.md.

variable "image" {
  type        = string
  default     = "atropos-sandbox:local"
  description = "Sandbox image (Dockerfile, target sandbox). TOOL_EXECUTOR_IMAGE."
}

variable "datacenters" {
  type    = list(string)
  default = ["*"]
}

variable "min_containers" {
  type        = number
  default     = 1
  description = "Sandboxes kept running. TOOL_EXECUTOR_MIN_CONTAINERS."
}

variable "max_containers" {
  type        = number
  default     = 10
  description = "Upper bound the executor may scale to. TOOL_EXECUTOR_MAX_CONTAINERS."
}

variable "slots" {
  type        = number
  default     = 10
  description = "Slots per sandbox. TOOL_EXECUTOR_SLOTS."
}

variable "privileged" {
  type        = bool
  default     = false
  description = "Run containers privileged; the clients must set allow_privileged. TOOL_EXECUTOR_PRIVILEGED."
}

variable "allow_network" {
  type    = bool
  default = true
}

variable "cpu_mhz" {
  type    = number
  default = 1000
}

variable "memory_mb" {
  type    = number
  default = 4096
}

variable "service_name" {
  type    = string
  default = "atropos-sandbox"
}

job "atropos-sandbox-tool-executor" {
  type        = "service"
  datacenters = var.datacenters

  group "sandbox" {
    # The executor changes the count through the scale API; scaling bounds what it may ask for
    # (Nomad refuses a count outside min..max).
    count = var.min_containers

    scaling {
      enabled = true
      min     = var.min_containers
      max     = var.max_containers
    }

    # No deployments. Every scale bumps the job version, and with the default update strategy
    # a service job then starts a deployment, which blocks the next scale ("job scaling
    # blocked due to active deployment"). max_parallel = 0 updates allocations in place.
    update {
      max_parallel = 0
    }

    # A sandbox that keeps crashing is failed quickly (the executor sees it and says why)
    # rather than restarted for ever on the same node ...
    restart {
      attempts = 3
      interval = "5m"
      delay    = "5s"
      mode     = "fail"
    }

    # ... and Nomad then places a replacement, elsewhere if it can, backing off.
    # attempts and interval do not apply when unlimited.
    reschedule {
      attempts       = 0
      delay          = "5s"
      delay_function = "exponential"
      max_delay      = "2m"
      unlimited      = true
    }

    network {
      mode = "host"

      # A dynamic host port mapped to 8080 inside the container. The executor connects to
      # HostIP:Value of this port, read from the allocation.
      port "http" {
        to = 8080
      }
    }

    # Nomad-native service and check: no Consul needed on the clients.
    service {
      name     = var.service_name
      port     = "http"
      provider = "nomad"

      check {
        name     = "sandbox-health"
        type     = "http"
        path     = "/health"
        interval = "5s"
        timeout  = "2s"
      }
    }

    task "sandbox-server" {
      driver = "docker"

      config {
        image = var.image
        ports = ["http"]
        # bubblewrap in every slot creates user, pid, ipc and uts namespaces and mounts a fresh
        # /proc. Inside Docker that needs privileged = true: Docker's default seccomp and
        # AppArmor profiles refuse the namespace and mount calls, and the kernel refuses a new
        # /proc while Docker masks parts of the container's /proc. See docs/operations.md.
        privileged = var.privileged

        # Unconfined seccomp and AppArmor lift the first two refusals without privileged mode,
        # but not the masked /proc (Docker's systempaths=unconfined is a docker CLI option the
        # Engine API does not take), so bubblewrap still fails its start-up probe:
        # security_opt = ["seccomp=unconfined", "apparmor=unconfined"]
      }

      # The server's settings; the executor passes its own TOOL_EXECUTOR_SANDBOX_* values down.
      env {
        ATROPOS_SANDBOX_HOST               = "0.0.0.0"
        ATROPOS_SANDBOX_PORT               = "8080"
        ATROPOS_SANDBOX_SLOTS              = "${var.slots}"
        ATROPOS_SANDBOX_ALLOW_NETWORK      = "${var.allow_network}"
        ATROPOS_SANDBOX_MEMORY_MB          = "2048"
        ATROPOS_SANDBOX_MAX_PROCESSES      = "256"
        ATROPOS_SANDBOX_MAX_OUTPUT_BYTES   = "65536"
        ATROPOS_SANDBOX_MAX_FILE_BYTES     = "5242880"
        ATROPOS_SANDBOX_DISK_MB            = "1024"
        ATROPOS_SANDBOX_MAX_REQUEST_BYTES  = "33554432"
        ATROPOS_SANDBOX_ISOLATION          = "bwrap"
        ATROPOS_SANDBOX_SLOT_UID_BASE      = "200000"
        ATROPOS_SANDBOX_TERMINAL_OUTPUT    = "split"
        ATROPOS_SANDBOX_JOB_TIMEOUT_S      = "300"
        ATROPOS_SANDBOX_UPLOAD_MAX_MB      = "1024"
        ATROPOS_SANDBOX_UPLOAD_MAX_ENTRIES = "200000"
        ATROPOS_SANDBOX_LAYER_CACHE_MB     = "8192"
        ATROPOS_SANDBOX_WORKSPACE_LAYERS   = "auto"
        ATROPOS_SANDBOX_WARM_SLOTS         = "32"
      }

      # The shared token every sandbox requires from the executor. It lives in a Nomad Variable
      # (the executor creates it on first start and reuses it after a restart), so it never
      # appears in the job spec, `nomad job inspect`, or a process list. Tasks of this job may
      # read nomad/jobs/<job id> through their workload identity, without any ACL policy.
      template {
        data        = <<-EOT
          ATROPOS_SANDBOX_TOKEN={{ with nomadVar "nomad/jobs/atropos-sandbox-tool-executor" }}{{ .sandbox_token }}{{ end }}
        EOT
        destination = "secrets/sandbox.env"
        env         = true
        change_mode = "restart"
      }

      resources {
        cpu    = var.cpu_mhz
        memory = var.memory_mb
      }

      # Time for the server to stop its slots (every process of every slot) on SIGTERM.
      kill_timeout = "15s"
    }
  }
}
