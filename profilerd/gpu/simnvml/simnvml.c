/*
 * simnvml: a simulated libnvidia-ml.so.1 for profilerd's tests.
 *
 * The real nvidia-ml-py bindings load this library (profilerd sets pynvml.nvmlLib from
 * PROFILERD_NVML_LIBRARY), so every ctypes signature and struct layout below must match the
 * installed pynvml.py exactly. Behaviour comes from a scenario file of key=value lines named by
 * the SIMNVML_SCENARIO environment variable; it is read on the first nvmlInitWithFlags() and
 * dropped on the last nvmlShutdown(), so one loaded copy can serve many tests in turn.
 *
 * Build with -DSIMNVML_OLD_DRIVER to leave out the symbols an old driver lacks (GPM, the _v2
 * memory query, TemperatureV, clock event reasons, remapped rows, compute processes _v3);
 * pynvml then raises NVMLError_FunctionNotFound for them, exactly as with a real old driver.
 *
 * Extra symbols prefixed simnvml_ let a test steer or observe the simulation at run time.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_ARGUMENT_VERSION_MISMATCH 25
#define NVML_ERROR_UNKNOWN 999

#define MAX_GPUS 16
#define MAX_MIG 7
#define MAX_PROCS 64
#define MAX_XIDS 64
#define MAX_PROC_SAMPLES 256
#define MAX_FN_COUNTERS 128
#define LIST_LEN 1024

#define HANDLE_MAGIC 0x51a7d3u
#define GPM_MAGIC 0x6b3a11u
#define EVENT_SET_MAGIC 0x3e7e47u

#define EVENT_XID 0x8ull
#define FIELD_MEMORY_TEMP 82u
#define FIELD_NVLINK_DATA_TX 138u
#define FIELD_NVLINK_DATA_RX 139u
#define FIELD_PCIE_TX_BYTES 197u
#define FIELD_PCIE_RX_BYTES 198u
#define VALUE_TYPE_UINT 1u
#define VALUE_TYPE_ULL 3u

typedef struct sim_handle {
    unsigned magic;
    int gpu;
    int mig; /* -1 for the physical GPU */
} sim_handle;

typedef sim_handle *nvmlDevice_t;

typedef struct {
    char name[96];
    char uuid[96];
    int gpm;
    int gpm_min_interval_ms;
    int mig;
    int mig_instances;
    unsigned long long mig_mem_total;
    unsigned long long mig_mem_used;
    unsigned long long mem_total, mem_used, mem_reserved;
    unsigned util_gpu, util_mem;
    unsigned power_mw, power_limit_mw;
    unsigned long long energy_step_mj;
    unsigned temp, mem_temp;
    unsigned sm_clock, sm_clock_max, mem_clock, mem_clock_max;
    unsigned long long clock_reasons;
    unsigned long long pcie_tx_step, pcie_rx_step;
    unsigned nvlink_links;
    unsigned long long nvlink_tx_step_kib, nvlink_rx_step_kib;
    unsigned long long ecc_corrected, ecc_uncorrected;
    unsigned remap_corr, remap_unc, remap_pending, remap_failure;
    double gpm_sm_util, gpm_sm_occupancy, gpm_tensor, gpm_dram, gpm_fp16, gpm_fp32, gpm_fp64;
    double gpm_drift; /* added to SM util per GPM sample before sample1: tells windows apart */
    int procutil_max_gens;
    long lost_after_calls; /* -1: never */
    long lost_for_calls;   /* -1: until simnvml_set_lost(i, 0) */
    char not_supported[LIST_LEN];
    char fail[LIST_LEN];
    /* run-time state */
    long calls;
    long lost_returned;
    int forced_lost;
    unsigned long long energy_mj, pcie_tx, pcie_rx, nvlink_ticks;
    int procutil_gens;
    unsigned long long gpm_seq;
} sim_gpu;

typedef struct {
    int gpu;
    unsigned pid;
    unsigned long long mem;
    unsigned sm_util;
} sim_proc;

typedef struct {
    unsigned pid;
    unsigned long long ts;
    unsigned sm_util;
} sim_proc_sample;

typedef struct {
    int gpu;
    unsigned long long xid;
    unsigned long long due_ns;
    int delivered;
} sim_xid;

typedef struct {
    char name[64];
    long count;
} fn_counter;

/* Structs shared with pynvml; layouts mirror its ctypes definitions. */
typedef struct {
    unsigned gpu, memory;
} nvmlUtilization_t;
typedef struct {
    unsigned long long total, free, used;
} nvmlMemory_t;
typedef struct {
    unsigned version;
    unsigned long long total, reserved, free, used;
} nvmlMemory_v2_t;
typedef struct {
    unsigned version;
    unsigned sensorType;
    int temperature;
} nvmlTemperature_v1_t;
typedef union {
    double dVal;
    unsigned uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned fieldId, scopeId;
    long long timestamp, latencyUsec;
    unsigned valueType, nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;
typedef struct {
    unsigned pid;
    unsigned long long usedGpuMemory;
    unsigned gpuInstanceId, computeInstanceId;
} nvmlProcessInfo_t;
typedef struct {
    unsigned pid;
    unsigned long long timeStamp;
    unsigned smUtil, memUtil, encUtil, decUtil;
} nvmlProcessUtilizationSample_t;
typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned gpuInstanceId, computeInstanceId;
} nvmlEventData_t;
typedef struct {
    unsigned magic;
    unsigned long long mask[MAX_GPUS];
} sim_event_set;
typedef sim_event_set *nvmlEventSet_t;

typedef struct {
    unsigned magic;
    int gpu;
    int filled;
    unsigned long long ts_ns;
    unsigned long long seq;
} sim_gpm_sample;
typedef struct {
    unsigned version, isSupportedDevice;
} nvmlGpmSupport_t;
typedef struct {
    const char *shortName, *longName, *unit;
} nvmlGpmMetricInfo_t;
typedef struct {
    unsigned metricId;
    unsigned nvmlReturn;
    double value;
    nvmlGpmMetricInfo_t metricInfo;
} nvmlGpmMetric_t;
typedef struct {
    unsigned version, numMetrics;
    sim_gpm_sample *sample1, *sample2;
    nvmlGpmMetric_t metrics[];
} nvmlGpmMetricsGet_t;

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_init_count;
static char g_driver_version[80];
static char g_nvml_version[80];
static int g_cuda_version;
static int g_init_error;
static int g_gpu_count;
static sim_gpu g_gpus[MAX_GPUS];
static sim_handle g_handles[MAX_GPUS];
static sim_handle g_mig_handles[MAX_GPUS][MAX_MIG];
static sim_proc g_procs[MAX_PROCS];
static int g_proc_count;
static sim_proc_sample g_proc_samples[MAX_GPUS][MAX_PROC_SAMPLES];
static int g_proc_sample_count[MAX_GPUS];
static sim_xid g_xids[MAX_XIDS];
static int g_xid_count;
static unsigned long long g_init_ns;
static fn_counter g_fn_counters[MAX_FN_COUNTERS];
static int g_fn_counter_count;

static unsigned long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (unsigned long long)ts.tv_sec * 1000000000ull + (unsigned long long)ts.tv_nsec;
}

static void copy_str(char *dst, size_t size, const char *src) {
    snprintf(dst, size, "%s", src);
}

/* ---------------------------------------------------------------- scenario */

static void reset_state(void) {
    memset(g_gpus, 0, sizeof(g_gpus));
    memset(g_proc_samples, 0, sizeof(g_proc_samples));
    memset(g_proc_sample_count, 0, sizeof(g_proc_sample_count));
    memset(g_fn_counters, 0, sizeof(g_fn_counters));
    g_fn_counter_count = 0;
    g_proc_count = 0;
    g_xid_count = 0;
    g_gpu_count = 0;
    g_init_error = 0;
    g_cuda_version = 12080;
    copy_str(g_driver_version, sizeof(g_driver_version), "570.00.00");
    copy_str(g_nvml_version, sizeof(g_nvml_version), "12.570.00.00");
    for (int i = 0; i < MAX_GPUS; i++) {
        g_gpus[i].lost_after_calls = -1;
        g_gpus[i].lost_for_calls = -1;
        g_gpus[i].gpm_min_interval_ms = 100;
        g_handles[i] = (sim_handle){HANDLE_MAGIC, i, -1};
        for (int m = 0; m < MAX_MIG; m++) {
            g_mig_handles[i][m] = (sim_handle){HANDLE_MAGIC, i, m};
        }
    }
}

static void set_gpu_key(sim_gpu *g, const char *key, const char *val) {
    unsigned long long u = strtoull(val, NULL, 0);
    double d = strtod(val, NULL);
    if (!strcmp(key, "name")) copy_str(g->name, sizeof(g->name), val);
    else if (!strcmp(key, "uuid")) copy_str(g->uuid, sizeof(g->uuid), val);
    else if (!strcmp(key, "not_supported")) snprintf(g->not_supported, LIST_LEN, ",%s,", val);
    else if (!strcmp(key, "fail")) snprintf(g->fail, LIST_LEN, ",%s,", val);
    else if (!strcmp(key, "gpm")) g->gpm = (int)u;
    else if (!strcmp(key, "gpm_min_interval_ms")) g->gpm_min_interval_ms = (int)u;
    else if (!strcmp(key, "mig")) g->mig = (int)u;
    else if (!strcmp(key, "mig_instances")) g->mig_instances = (int)u;
    else if (!strcmp(key, "mig_mem_total")) g->mig_mem_total = u;
    else if (!strcmp(key, "mig_mem_used")) g->mig_mem_used = u;
    else if (!strcmp(key, "mem_total")) g->mem_total = u;
    else if (!strcmp(key, "mem_used")) g->mem_used = u;
    else if (!strcmp(key, "mem_reserved")) g->mem_reserved = u;
    else if (!strcmp(key, "util_gpu")) g->util_gpu = (unsigned)u;
    else if (!strcmp(key, "util_mem")) g->util_mem = (unsigned)u;
    else if (!strcmp(key, "power_mw")) g->power_mw = (unsigned)u;
    else if (!strcmp(key, "power_limit_mw")) g->power_limit_mw = (unsigned)u;
    else if (!strcmp(key, "energy_step_mj")) g->energy_step_mj = u;
    else if (!strcmp(key, "temp")) g->temp = (unsigned)u;
    else if (!strcmp(key, "mem_temp")) g->mem_temp = (unsigned)u;
    else if (!strcmp(key, "sm_clock")) g->sm_clock = (unsigned)u;
    else if (!strcmp(key, "sm_clock_max")) g->sm_clock_max = (unsigned)u;
    else if (!strcmp(key, "mem_clock")) g->mem_clock = (unsigned)u;
    else if (!strcmp(key, "mem_clock_max")) g->mem_clock_max = (unsigned)u;
    else if (!strcmp(key, "clock_reasons")) g->clock_reasons = u;
    else if (!strcmp(key, "pcie_tx_step")) g->pcie_tx_step = u;
    else if (!strcmp(key, "pcie_rx_step")) g->pcie_rx_step = u;
    else if (!strcmp(key, "nvlink_links")) g->nvlink_links = (unsigned)u;
    else if (!strcmp(key, "nvlink_tx_step_kib")) g->nvlink_tx_step_kib = u;
    else if (!strcmp(key, "nvlink_rx_step_kib")) g->nvlink_rx_step_kib = u;
    else if (!strcmp(key, "ecc_corrected")) g->ecc_corrected = u;
    else if (!strcmp(key, "ecc_uncorrected")) g->ecc_uncorrected = u;
    else if (!strcmp(key, "remap_corr")) g->remap_corr = (unsigned)u;
    else if (!strcmp(key, "remap_unc")) g->remap_unc = (unsigned)u;
    else if (!strcmp(key, "remap_pending")) g->remap_pending = (unsigned)u;
    else if (!strcmp(key, "remap_failure")) g->remap_failure = (unsigned)u;
    else if (!strcmp(key, "gpm_sm_util")) g->gpm_sm_util = d;
    else if (!strcmp(key, "gpm_sm_occupancy")) g->gpm_sm_occupancy = d;
    else if (!strcmp(key, "gpm_tensor")) g->gpm_tensor = d;
    else if (!strcmp(key, "gpm_dram")) g->gpm_dram = d;
    else if (!strcmp(key, "gpm_fp16")) g->gpm_fp16 = d;
    else if (!strcmp(key, "gpm_fp32")) g->gpm_fp32 = d;
    else if (!strcmp(key, "gpm_fp64")) g->gpm_fp64 = d;
    else if (!strcmp(key, "gpm_drift")) g->gpm_drift = d;
    else if (!strcmp(key, "procutil_max_gens")) g->procutil_max_gens = (int)u;
    else if (!strcmp(key, "lost_after_calls")) g->lost_after_calls = strtol(val, NULL, 0);
    else if (!strcmp(key, "lost_for_calls")) g->lost_for_calls = strtol(val, NULL, 0);
    else fprintf(stderr, "simnvml: unknown gpu key %s\n", key);
}

static void parse_line(char *line) {
    char *nl = strpbrk(line, "\r\n");
    if (nl) *nl = '\0';
    if (line[0] == '\0' || line[0] == '#') return;
    char *eq = strchr(line, '=');
    if (!eq) return;
    *eq = '\0';
    const char *key = line;
    const char *val = eq + 1;
    if (!strcmp(key, "driver_version")) {
        copy_str(g_driver_version, sizeof(g_driver_version), val);
    } else if (!strcmp(key, "nvml_version")) {
        copy_str(g_nvml_version, sizeof(g_nvml_version), val);
    } else if (!strcmp(key, "cuda_version")) {
        g_cuda_version = atoi(val);
    } else if (!strcmp(key, "init_error")) {
        g_init_error = atoi(val);
    } else if (!strcmp(key, "gpu_count")) {
        g_gpu_count = atoi(val);
        if (g_gpu_count > MAX_GPUS) g_gpu_count = MAX_GPUS;
    } else if (!strcmp(key, "process")) {
        sim_proc p;
        if (g_proc_count < MAX_PROCS &&
            sscanf(val, "%d:%u:%llu:%u", &p.gpu, &p.pid, &p.mem, &p.sm_util) == 4) {
            g_procs[g_proc_count++] = p;
        }
    } else if (!strcmp(key, "xid")) {
        int gpu;
        unsigned long long xid, delay_ms;
        if (g_xid_count < MAX_XIDS && sscanf(val, "%d:%llu:%llu", &gpu, &xid, &delay_ms) == 3) {
            g_xids[g_xid_count++] = (sim_xid){gpu, xid, delay_ms * 1000000ull, 0};
        }
    } else if (!strncmp(key, "gpu.", 4)) {
        char *dot;
        long idx = strtol(key + 4, &dot, 10);
        if (*dot == '.' && idx >= 0 && idx < MAX_GPUS) set_gpu_key(&g_gpus[idx], dot + 1, val);
    } else {
        fprintf(stderr, "simnvml: unknown key %s\n", key);
    }
}

static void load_scenario(void) {
    reset_state();
    const char *path = getenv("SIMNVML_SCENARIO");
    if (!path) return;
    FILE *f = fopen(path, "r");
    if (!f) return;
    char line[2048];
    while (fgets(line, sizeof(line), f)) parse_line(line);
    fclose(f);
    g_init_ns = now_ns();
    for (int i = 0; i < g_xid_count; i++) g_xids[i].due_ns += g_init_ns;
}

/* ---------------------------------------------------------------- helpers */

static void count_fn(const char *fn) {
    for (int i = 0; i < g_fn_counter_count; i++) {
        if (!strcmp(g_fn_counters[i].name, fn)) {
            g_fn_counters[i].count++;
            return;
        }
    }
    if (g_fn_counter_count < MAX_FN_COUNTERS) {
        copy_str(g_fn_counters[g_fn_counter_count].name, 64, fn);
        g_fn_counters[g_fn_counter_count++].count = 1;
    }
}

static int listed(const char *list, const char *item) {
    char needle[96];
    snprintf(needle, sizeof(needle), ",%s,", item);
    return strstr(list, needle) != NULL;
}

static int fail_code(const char *list, const char *fn) {
    char needle[96];
    snprintf(needle, sizeof(needle), ",%s:", fn);
    const char *hit = strstr(list, needle);
    return hit ? atoi(hit + strlen(needle)) : 0;
}

/* Validate a handle and apply the scenario's lost / not-supported / failure rules. Call with
 * g_lock held. */
static int check(nvmlDevice_t dev, const char *fn, sim_gpu **out) {
    count_fn(fn);
    if (g_init_count == 0) return NVML_ERROR_UNINITIALIZED;
    if (!dev || dev->magic != HANDLE_MAGIC || dev->gpu < 0 || dev->gpu >= g_gpu_count) {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    sim_gpu *g = &g_gpus[dev->gpu];
    g->calls++;
    if (g->forced_lost) return NVML_ERROR_GPU_IS_LOST;
    if (g->lost_after_calls >= 0 && g->calls > g->lost_after_calls &&
        (g->lost_for_calls < 0 || g->lost_returned < g->lost_for_calls)) {
        g->lost_returned++;
        return NVML_ERROR_GPU_IS_LOST;
    }
    if (listed(g->not_supported, fn)) return NVML_ERROR_NOT_SUPPORTED;
    int code = fail_code(g->fail, fn);
    if (code) return code;
    *out = g;
    return NVML_SUCCESS;
}

#define BEGIN(dev)                                  \
    sim_gpu *g = NULL;                              \
    pthread_mutex_lock(&g_lock);                    \
    int rc_ = check((dev), __func__, &g);           \
    if (rc_ != NVML_SUCCESS) {                      \
        pthread_mutex_unlock(&g_lock);              \
        return rc_;                                 \
    }
#define END(rc)                                     \
    do {                                            \
        pthread_mutex_unlock(&g_lock);              \
        return (rc);                                \
    } while (0)

/* ---------------------------------------------------------------- init and system */

int nvmlInitWithFlags(unsigned flags) {
    (void)flags;
    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0) {
        load_scenario();
        if (g_init_error) {
            int rc = g_init_error;
            pthread_mutex_unlock(&g_lock);
            return rc;
        }
    }
    g_init_count++;
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}

int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void) {
    pthread_mutex_lock(&g_lock);
    if (g_init_count == 0) {
        pthread_mutex_unlock(&g_lock);
        return NVML_ERROR_UNINITIALIZED;
    }
    g_init_count--;
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    default: return "Simulated error";
    }
}

static int system_string(char *buf, unsigned len, const char *value) {
    pthread_mutex_lock(&g_lock);
    int rc = NVML_SUCCESS;
    if (g_init_count == 0) rc = NVML_ERROR_UNINITIALIZED;
    else if (strlen(value) + 1 > len) rc = NVML_ERROR_INSUFFICIENT_SIZE;
    else copy_str(buf, len, value);
    pthread_mutex_unlock(&g_lock);
    return rc;
}

int nvmlSystemGetDriverVersion(char *buf, unsigned len) {
    return system_string(buf, len, g_driver_version);
}

int nvmlSystemGetNVMLVersion(char *buf, unsigned len) {
    return system_string(buf, len, g_nvml_version);
}

int nvmlSystemGetCudaDriverVersion(int *version) {
    *version = g_cuda_version;
    return g_init_count ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
}

int nvmlSystemGetCudaDriverVersion_v2(int *version) { return nvmlSystemGetCudaDriverVersion(version); }

int nvmlDeviceGetCount_v2(unsigned *count) {
    pthread_mutex_lock(&g_lock);
    int rc = g_init_count ? NVML_SUCCESS : NVML_ERROR_UNINITIALIZED;
    *count = (unsigned)g_gpu_count;
    pthread_mutex_unlock(&g_lock);
    return rc;
}

int nvmlDeviceGetHandleByIndex_v2(unsigned index, nvmlDevice_t *out) {
    if (index >= (unsigned)g_gpu_count) return NVML_ERROR_INVALID_ARGUMENT;
    BEGIN(&g_handles[index]);
    (void)g;
    *out = &g_handles[index];
    END(NVML_SUCCESS);
}

/* ---------------------------------------------------------------- device queries */

int nvmlDeviceGetUUID(nvmlDevice_t dev, char *buf, unsigned len) {
    BEGIN(dev);
    if (dev->mig >= 0) snprintf(buf, len, "MIG-%s-%d", g->uuid + 4, dev->mig);
    else copy_str(buf, len, g->uuid);
    END(NVML_SUCCESS);
}

int nvmlDeviceGetName(nvmlDevice_t dev, char *buf, unsigned len) {
    BEGIN(dev);
    copy_str(buf, len, g->name);
    END(NVML_SUCCESS);
}

int nvmlDeviceGetUtilizationRates(nvmlDevice_t dev, nvmlUtilization_t *u) {
    BEGIN(dev);
    if (g->mig) END(NVML_ERROR_NOT_SUPPORTED); /* as on real MIG-enabled GPUs */
    u->gpu = g->util_gpu;
    u->memory = g->util_mem;
    END(NVML_SUCCESS);
}

static void mem_values(nvmlDevice_t dev, sim_gpu *g, unsigned long long *total,
                       unsigned long long *used, unsigned long long *reserved) {
    if (dev->mig >= 0) {
        *total = g->mig_mem_total;
        *used = g->mig_mem_used + (unsigned long long)dev->mig * 1024ull * 1024ull;
        *reserved = 0;
    } else {
        *total = g->mem_total;
        *used = g->mem_used;
        *reserved = g->mem_reserved;
    }
}

int nvmlDeviceGetMemoryInfo(nvmlDevice_t dev, nvmlMemory_t *m) {
    BEGIN(dev);
    unsigned long long total, used, reserved;
    mem_values(dev, g, &total, &used, &reserved);
    m->total = total;
    m->used = used + reserved; /* v1 counts the reserved memory as used */
    m->free = total - m->used;
    END(NVML_SUCCESS);
}

#ifndef SIMNVML_OLD_DRIVER
int nvmlDeviceGetMemoryInfo_v2(nvmlDevice_t dev, nvmlMemory_v2_t *m) {
    BEGIN(dev);
    if (m->version != 0x02000028u) END(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    unsigned long long total, used, reserved;
    mem_values(dev, g, &total, &used, &reserved);
    m->total = total;
    m->used = used;
    m->reserved = reserved;
    m->free = total - used - reserved;
    END(NVML_SUCCESS);
}
#endif

int nvmlDeviceGetPowerUsage(nvmlDevice_t dev, unsigned *mw) {
    BEGIN(dev);
    *mw = g->power_mw;
    END(NVML_SUCCESS);
}

int nvmlDeviceGetTotalEnergyConsumption(nvmlDevice_t dev, unsigned long long *mj) {
    BEGIN(dev);
    g->energy_mj += g->energy_step_mj;
    *mj = g->energy_mj;
    END(NVML_SUCCESS);
}

int nvmlDeviceGetEnforcedPowerLimit(nvmlDevice_t dev, unsigned *mw) {
    BEGIN(dev);
    *mw = g->power_limit_mw;
    END(NVML_SUCCESS);
}

int nvmlDeviceGetTemperature(nvmlDevice_t dev, unsigned sensor, unsigned *temp) {
    BEGIN(dev);
    if (sensor != 0) END(NVML_ERROR_INVALID_ARGUMENT);
    *temp = g->temp;
    END(NVML_SUCCESS);
}

#ifndef SIMNVML_OLD_DRIVER
int nvmlDeviceGetTemperatureV(nvmlDevice_t dev, nvmlTemperature_v1_t *t) {
    BEGIN(dev);
    if (t->version != 0x100000Cu) END(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (t->sensorType != 0) END(NVML_ERROR_INVALID_ARGUMENT);
    t->temperature = (int)g->temp;
    END(NVML_SUCCESS);
}
#endif

int nvmlDeviceGetClockInfo(nvmlDevice_t dev, unsigned type, unsigned *mhz) {
    BEGIN(dev);
    if (type == 1) *mhz = g->sm_clock;
    else if (type == 2) *mhz = g->mem_clock;
    else END(NVML_ERROR_INVALID_ARGUMENT);
    END(NVML_SUCCESS);
}

int nvmlDeviceGetMaxClockInfo(nvmlDevice_t dev, unsigned type, unsigned *mhz) {
    BEGIN(dev);
    if (type == 1) *mhz = g->sm_clock_max;
    else if (type == 2) *mhz = g->mem_clock_max;
    else END(NVML_ERROR_INVALID_ARGUMENT);
    END(NVML_SUCCESS);
}

#ifndef SIMNVML_OLD_DRIVER
int nvmlDeviceGetCurrentClocksEventReasons(nvmlDevice_t dev, unsigned long long *reasons) {
    BEGIN(dev);
    *reasons = g->clock_reasons;
    END(NVML_SUCCESS);
}
#endif

int nvmlDeviceGetCurrentClocksThrottleReasons(nvmlDevice_t dev, unsigned long long *reasons) {
    BEGIN(dev);
    *reasons = g->clock_reasons;
    END(NVML_SUCCESS);
}

static void field_value(sim_gpu *g, nvmlFieldValue_t *v) {
    char name[32];
    snprintf(name, sizeof(name), "field:%u", v->fieldId);
    v->timestamp = (long long)(now_ns() / 1000ull);
    v->latencyUsec = 0;
    v->nvmlReturn = NVML_SUCCESS;
    if (listed(g->not_supported, name)) {
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        return;
    }
    switch (v->fieldId) {
    case FIELD_MEMORY_TEMP:
        v->valueType = VALUE_TYPE_UINT;
        v->value.uiVal = g->mem_temp;
        break;
    case FIELD_PCIE_TX_BYTES:
        g->pcie_tx += g->pcie_tx_step;
        v->valueType = VALUE_TYPE_ULL;
        v->value.ullVal = g->pcie_tx;
        break;
    case FIELD_PCIE_RX_BYTES:
        g->pcie_rx += g->pcie_rx_step;
        v->valueType = VALUE_TYPE_ULL;
        v->value.ullVal = g->pcie_rx;
        break;
    case FIELD_NVLINK_DATA_TX:
    case FIELD_NVLINK_DATA_RX: {
        if (g->nvlink_links == 0) {
            v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
            return;
        }
        unsigned long long step =
            v->fieldId == FIELD_NVLINK_DATA_TX ? g->nvlink_tx_step_kib : g->nvlink_rx_step_kib;
        if (v->fieldId == FIELD_NVLINK_DATA_TX) g->nvlink_ticks++;
        unsigned long long per_link = g->nvlink_ticks * step;
        v->valueType = VALUE_TYPE_ULL;
        if (v->scopeId == 0xFFFFFFFFu) v->value.ullVal = per_link * g->nvlink_links;
        else if (v->scopeId < g->nvlink_links) v->value.ullVal = per_link;
        else v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
        break;
    }
    default:
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
    }
}

int nvmlDeviceGetFieldValues(nvmlDevice_t dev, int count, nvmlFieldValue_t *values) {
    BEGIN(dev);
    if (count < 0 || (count > 0 && !values)) END(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < count; i++) field_value(g, &values[i]);
    END(NVML_SUCCESS);
}

int nvmlDeviceGetTotalEccErrors(nvmlDevice_t dev, unsigned error_type, unsigned counter_type,
                                unsigned long long *count) {
    BEGIN(dev);
    if (counter_type > 1) END(NVML_ERROR_INVALID_ARGUMENT);
    if (error_type == 0) *count = g->ecc_corrected;
    else if (error_type == 1) *count = g->ecc_uncorrected;
    else END(NVML_ERROR_INVALID_ARGUMENT);
    END(NVML_SUCCESS);
}

#ifndef SIMNVML_OLD_DRIVER
int nvmlDeviceGetRemappedRows(nvmlDevice_t dev, unsigned *corr, unsigned *unc, unsigned *pending,
                              unsigned *failure) {
    BEGIN(dev);
    *corr = g->remap_corr;
    *unc = g->remap_unc;
    *pending = g->remap_pending;
    *failure = g->remap_failure;
    END(NVML_SUCCESS);
}
#endif

/* Present only so tests can prove it is never called: on real drivers it blocks ~20 ms. */
int nvmlDeviceGetPcieThroughput(nvmlDevice_t dev, unsigned counter, unsigned *kib_per_s) {
    BEGIN(dev);
    (void)g;
    (void)counter;
    *kib_per_s = 0;
    END(NVML_SUCCESS);
}

/* ---------------------------------------------------------------- MIG */

int nvmlDeviceGetMigMode(nvmlDevice_t dev, unsigned *current, unsigned *pending) {
    BEGIN(dev);
    *current = (unsigned)g->mig;
    *pending = (unsigned)g->mig;
    END(NVML_SUCCESS);
}

int nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t dev, unsigned *count) {
    BEGIN(dev);
    *count = MAX_MIG;
    END(NVML_SUCCESS);
}

int nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t dev, unsigned index, nvmlDevice_t *out) {
    BEGIN(dev);
    if (!g->mig) END(NVML_ERROR_INVALID_ARGUMENT);
    if (index >= (unsigned)g->mig_instances || index >= MAX_MIG) END(NVML_ERROR_NOT_FOUND);
    *out = &g_mig_handles[dev->gpu][index];
    END(NVML_SUCCESS);
}

int nvmlDeviceGetGpuInstanceId(nvmlDevice_t dev, unsigned *id) {
    BEGIN(dev);
    (void)g;
    if (dev->mig < 0) END(NVML_ERROR_INVALID_ARGUMENT);
    *id = (unsigned)(dev->mig + 1);
    END(NVML_SUCCESS);
}

/* ---------------------------------------------------------------- GPM */

#ifndef SIMNVML_OLD_DRIVER
int nvmlGpmQueryDeviceSupport(nvmlDevice_t dev, nvmlGpmSupport_t *s) {
    BEGIN(dev);
    if (s->version != 1) END(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    s->isSupportedDevice = (unsigned)g->gpm;
    END(NVML_SUCCESS);
}

int nvmlGpmSampleAlloc(sim_gpm_sample **out) {
    sim_gpm_sample *s = calloc(1, sizeof(*s));
    if (!s) return NVML_ERROR_UNKNOWN;
    s->magic = GPM_MAGIC;
    s->gpu = -1;
    *out = s;
    return NVML_SUCCESS;
}

int nvmlGpmSampleFree(sim_gpm_sample *s) {
    if (!s || s->magic != GPM_MAGIC) return NVML_ERROR_INVALID_ARGUMENT;
    s->magic = 0;
    free(s);
    return NVML_SUCCESS;
}

int nvmlGpmSampleGet(nvmlDevice_t dev, sim_gpm_sample *s) {
    BEGIN(dev);
    if (!s || s->magic != GPM_MAGIC) END(NVML_ERROR_INVALID_ARGUMENT);
    if (!g->gpm || g->mig) END(NVML_ERROR_NOT_SUPPORTED);
    s->gpu = dev->gpu;
    s->filled = 1;
    s->ts_ns = now_ns();
    s->seq = g->gpm_seq++;
    END(NVML_SUCCESS);
}

static const char *k_metric_name = "sim";

int nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *m) {
    pthread_mutex_lock(&g_lock);
    count_fn(__func__);
    int rc = NVML_SUCCESS;
    sim_gpm_sample *a = m ? m->sample1 : NULL;
    sim_gpm_sample *b = m ? m->sample2 : NULL;
    if (!m || m->version != 1) rc = NVML_ERROR_ARGUMENT_VERSION_MISMATCH;
    else if (!a || !b || a->magic != GPM_MAGIC || b->magic != GPM_MAGIC) rc = NVML_ERROR_INVALID_ARGUMENT;
    else if (!a->filled || !b->filled || a->gpu != b->gpu || a->gpu < 0) rc = NVML_ERROR_INVALID_ARGUMENT;
    /* sample1 must be the older one, and the samples at least the scenario's interval apart */
    else if (b->ts_ns <= a->ts_ns ||
             b->ts_ns - a->ts_ns < (unsigned long long)g_gpus[a->gpu].gpm_min_interval_ms * 1000000ull)
        rc = NVML_ERROR_INVALID_ARGUMENT;
    if (rc != NVML_SUCCESS) {
        pthread_mutex_unlock(&g_lock);
        return rc;
    }
    sim_gpu *g = &g_gpus[a->gpu];
    for (unsigned i = 0; i < m->numMetrics; i++) {
        nvmlGpmMetric_t *x = &m->metrics[i];
        x->nvmlReturn = NVML_SUCCESS;
        x->metricInfo.shortName = k_metric_name;
        x->metricInfo.longName = k_metric_name;
        x->metricInfo.unit = k_metric_name;
        switch (x->metricId) {
        case 2: x->value = g->gpm_sm_util + g->gpm_drift * (double)a->seq; break;
        case 3: x->value = g->gpm_sm_occupancy; break;
        case 5: x->value = g->gpm_tensor; break;
        case 10: x->value = g->gpm_dram; break;
        case 11: x->value = g->gpm_fp64; break;
        case 12: x->value = g->gpm_fp32; break;
        case 13: x->value = g->gpm_fp16; break;
        default: x->nvmlReturn = NVML_ERROR_NOT_SUPPORTED; x->value = 0.0;
        }
    }
    pthread_mutex_unlock(&g_lock);
    return NVML_SUCCESS;
}
#endif

/* ---------------------------------------------------------------- processes */

static int running_processes(nvmlDevice_t dev, sim_gpu *g, unsigned *count, nvmlProcessInfo_t *out) {
    (void)g;
    unsigned n = 0;
    for (int i = 0; i < g_proc_count; i++) n += g_procs[i].gpu == dev->gpu;
    if (!out) {
        if (n == 0) {
            *count = 0;
            return NVML_SUCCESS;
        }
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    if (*count < n) {
        *count = n;
        return NVML_ERROR_INSUFFICIENT_SIZE;
    }
    unsigned k = 0;
    for (int i = 0; i < g_proc_count; i++) {
        if (g_procs[i].gpu != dev->gpu) continue;
        out[k].pid = g_procs[i].pid;
        out[k].usedGpuMemory = g_procs[i].mem;
        out[k].gpuInstanceId = 0xFFFFFFFFu;
        out[k].computeInstanceId = 0xFFFFFFFFu;
        k++;
    }
    *count = k;
    return NVML_SUCCESS;
}

#ifndef SIMNVML_OLD_DRIVER
int nvmlDeviceGetComputeRunningProcesses_v3(nvmlDevice_t dev, unsigned *count, nvmlProcessInfo_t *out) {
    BEGIN(dev);
    END(running_processes(dev, g, count, out));
}
#endif

int nvmlDeviceGetComputeRunningProcesses_v2(nvmlDevice_t dev, unsigned *count, nvmlProcessInfo_t *out) {
    BEGIN(dev);
    END(running_processes(dev, g, count, out));
}

/* Each size query (samples == NULL) adds one utilisation sample per process, up to
 * procutil_max_gens generations; only samples newer than last_seen are returned. */
int nvmlDeviceGetProcessUtilization(nvmlDevice_t dev, nvmlProcessUtilizationSample_t *samples,
                                    unsigned *count, unsigned long long last_seen) {
    BEGIN(dev);
    int gi = dev->gpu;
    if (!samples && g->procutil_gens < g->procutil_max_gens) {
        unsigned long long ts = 1000000ull * (unsigned long long)(g->procutil_gens + 1);
        for (int i = 0; i < g_proc_count; i++) {
            if (g_procs[i].gpu != gi || g_proc_sample_count[gi] >= MAX_PROC_SAMPLES) continue;
            unsigned util = g_procs[i].sm_util + (unsigned)g->procutil_gens;
            g_proc_samples[gi][g_proc_sample_count[gi]++] =
                (sim_proc_sample){g_procs[i].pid, ts, util > 100 ? 100 : util};
        }
        g->procutil_gens++;
    }
    unsigned n = 0;
    for (int i = 0; i < g_proc_sample_count[gi]; i++) n += g_proc_samples[gi][i].ts > last_seen;
    if (n == 0) END(NVML_ERROR_NOT_FOUND);
    if (!samples || *count < n) {
        *count = n;
        END(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    unsigned k = 0;
    for (int i = 0; i < g_proc_sample_count[gi]; i++) {
        sim_proc_sample *s = &g_proc_samples[gi][i];
        if (s->ts <= last_seen) continue;
        samples[k] = (nvmlProcessUtilizationSample_t){s->pid, s->ts, s->sm_util, 0, 0, 0};
        k++;
    }
    *count = k;
    END(NVML_SUCCESS);
}

/* ---------------------------------------------------------------- events */

int nvmlEventSetCreate(nvmlEventSet_t *out) {
    sim_event_set *s = calloc(1, sizeof(*s));
    if (!s) return NVML_ERROR_UNKNOWN;
    s->magic = EVENT_SET_MAGIC;
    *out = s;
    return NVML_SUCCESS;
}

int nvmlEventSetFree(nvmlEventSet_t s) {
    if (!s || s->magic != EVENT_SET_MAGIC) return NVML_ERROR_INVALID_ARGUMENT;
    s->magic = 0;
    free(s);
    return NVML_SUCCESS;
}

int nvmlDeviceGetSupportedEventTypes(nvmlDevice_t dev, unsigned long long *types) {
    BEGIN(dev);
    (void)g;
    *types = EVENT_XID | 0x1ull | 0x2ull;
    END(NVML_SUCCESS);
}

int nvmlDeviceRegisterEvents(nvmlDevice_t dev, unsigned long long types, nvmlEventSet_t s) {
    BEGIN(dev);
    (void)g;
    if (!s || s->magic != EVENT_SET_MAGIC) END(NVML_ERROR_INVALID_ARGUMENT);
    s->mask[dev->gpu] |= types;
    END(NVML_SUCCESS);
}

int nvmlEventSetWait_v2(nvmlEventSet_t s, nvmlEventData_t *data, unsigned timeout_ms) {
    if (!s || s->magic != EVENT_SET_MAGIC) return NVML_ERROR_INVALID_ARGUMENT;
    unsigned long long deadline = now_ns() + (unsigned long long)timeout_ms * 1000000ull;
    for (;;) {
        pthread_mutex_lock(&g_lock);
        if (g_init_count == 0) {
            pthread_mutex_unlock(&g_lock);
            return NVML_ERROR_UNINITIALIZED;
        }
        unsigned long long now = now_ns();
        for (int i = 0; i < g_xid_count; i++) {
            sim_xid *x = &g_xids[i];
            if (x->delivered || x->due_ns > now || x->gpu < 0 || x->gpu >= g_gpu_count) continue;
            if (!(s->mask[x->gpu] & EVENT_XID)) continue;
            x->delivered = 1;
            data->device = &g_handles[x->gpu];
            data->eventType = EVENT_XID;
            data->eventData = x->xid;
            data->gpuInstanceId = 0xFFFFFFFFu;
            data->computeInstanceId = 0xFFFFFFFFu;
            pthread_mutex_unlock(&g_lock);
            return NVML_SUCCESS;
        }
        pthread_mutex_unlock(&g_lock);
        if (now >= deadline) return NVML_ERROR_TIMEOUT;
        struct timespec nap = {0, 2000000};
        nanosleep(&nap, NULL);
    }
}

/* ---------------------------------------------------------------- test controls */

void simnvml_set_lost(int gpu, int lost) {
    pthread_mutex_lock(&g_lock);
    if (gpu >= 0 && gpu < MAX_GPUS) g_gpus[gpu].forced_lost = lost;
    pthread_mutex_unlock(&g_lock);
}

long simnvml_device_calls(int gpu) {
    pthread_mutex_lock(&g_lock);
    long n = (gpu >= 0 && gpu < MAX_GPUS) ? g_gpus[gpu].calls : -1;
    pthread_mutex_unlock(&g_lock);
    return n;
}

long simnvml_function_calls(const char *fn) {
    pthread_mutex_lock(&g_lock);
    long n = 0;
    for (int i = 0; i < g_fn_counter_count; i++) {
        if (!strcmp(g_fn_counters[i].name, fn)) n = g_fn_counters[i].count;
    }
    pthread_mutex_unlock(&g_lock);
    return n;
}

void simnvml_set_not_supported(int gpu, const char *list) {
    pthread_mutex_lock(&g_lock);
    if (gpu >= 0 && gpu < MAX_GPUS) snprintf(g_gpus[gpu].not_supported, LIST_LEN, ",%s,", list);
    pthread_mutex_unlock(&g_lock);
}

/* Move a process to another GPU; -1 takes it off every GPU (it exited). */
void simnvml_move_process(unsigned pid, int gpu) {
    pthread_mutex_lock(&g_lock);
    for (int i = 0; i < g_proc_count; i++) {
        if (g_procs[i].pid == pid) g_procs[i].gpu = gpu;
    }
    pthread_mutex_unlock(&g_lock);
}

void simnvml_inject_xid(int gpu, unsigned long long xid) {
    pthread_mutex_lock(&g_lock);
    if (g_xid_count < MAX_XIDS) g_xids[g_xid_count++] = (sim_xid){gpu, xid, 0, 0};
    pthread_mutex_unlock(&g_lock);
}

int simnvml_init_count(void) {
    pthread_mutex_lock(&g_lock);
    int n = g_init_count;
    pthread_mutex_unlock(&g_lock);
    return n;
}
