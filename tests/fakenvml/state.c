/* Fake NVML: scenario loading, value evolution, control file, rules, events.
 * See README.md for the scenario and control formats.
 */
#define _GNU_SOURCE
#include "state.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t g_cv;
int g_refcount;
unsigned g_epoch;
fake_dev g_dev[MAX_DEV];
int g_ndev;
fake_mig g_mig_pool[MAX_MIG_POOL];
int g_nmig_pool;
evset g_sets[MAX_SETS];
char g_driver[80];
char g_nvml_version[96];
int g_cuda_version;

static char g_control_path[4096];
static off_t g_control_off;
static char *g_partial;
static size_t g_partial_len;
static rule g_rules[MAX_RULES];
static int g_nvlink_all;
static int g_nvlink_fabric; /* "nvlink": "switch": every GPU's links lead to NVSwitches */
int g_pcie_level[MAX_DEV][MAX_DEV];
int g_pcie_matrix;

static struct {
    const char *name;
    unsigned long long n[MAX_DEV + 1];
} g_counts[MAX_SYMS];
static unsigned long long g_fv_counts[MAX_DEV][MAX_FI];

static const struct {
    const char *name;
    int src;
} NAMES[] = {
    {"DCGM_FI_DEV_SM_CLOCK", S_SM_CLOCK},
    {"DCGM_FI_DEV_MEM_CLOCK", S_MEM_CLOCK},
    {"DCGM_FI_DEV_MEMORY_TEMP", S_MEMORY_TEMP},
    {"DCGM_FI_DEV_GPU_TEMP", S_GPU_TEMP},
    {"DCGM_FI_DEV_POWER_USAGE", S_POWER},
    {"DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", S_ENERGY},
    {"DCGM_FI_DEV_PCIE_REPLAY_COUNTER", S_REPLAY},
    {"DCGM_FI_DEV_GPU_UTIL", S_GPU_UTIL},
    {"DCGM_FI_DEV_MEM_COPY_UTIL", S_MEM_UTIL},
    {"DCGM_FI_DEV_ENC_UTIL", S_ENC_UTIL},
    {"DCGM_FI_DEV_DEC_UTIL", S_DEC_UTIL},
    {"DCGM_FI_DEV_FB_TOTAL", S_FB_TOTAL},
    {"DCGM_FI_DEV_FB_RESERVED", S_FB_RESERVED},
    {"DCGM_FI_DEV_FB_USED", S_FB_USED},
    {"DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", S_NVLINK},
    {"DCGM_FI_DEV_VGPU_LICENSE_STATUS", S_VGPU_LICENSE},
    {"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", S_REMAP_UNC},
    {"DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", S_REMAP_COR},
    {"DCGM_FI_DEV_ROW_REMAP_FAILURE", S_REMAP_FAIL},
    {"DCGM_FI_DEV_ROW_REMAP_PENDING", S_REMAP_PEND},
    {"DCGM_FI_DEV_ECC_SBE_VOL_TOTAL", S_ECC_SBE_VOL},
    {"DCGM_FI_DEV_ECC_DBE_VOL_TOTAL", S_ECC_DBE_VOL},
    {"DCGM_FI_DEV_ECC_SBE_AGG_TOTAL", S_ECC_SBE_AGG},
    {"DCGM_FI_DEV_ECC_DBE_AGG_TOTAL", S_ECC_DBE_AGG},
    {"DCGM_FI_DEV_RETIRED_SBE", S_RET_SBE},
    {"DCGM_FI_DEV_RETIRED_DBE", S_RET_DBE},
    {"DCGM_FI_DEV_RETIRED_PENDING", S_RET_PEND},
    {"DCGM_FI_DEV_CLOCKS_EVENT_REASONS", S_CLK_REASONS},
    {"DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", S_CLK_REASONS},
    {"DCGM_FI_DEV_POWER_VIOLATION", S_VIOL_POWER},
    {"DCGM_FI_DEV_THERMAL_VIOLATION", S_VIOL_THERMAL},
    {"DCGM_FI_DEV_SYNC_BOOST_VIOLATION", S_VIOL_SYNC},
    {"DCGM_FI_DEV_BOARD_LIMIT_VIOLATION", S_VIOL_BOARD},
    {"DCGM_FI_DEV_LOW_UTIL_VIOLATION", S_VIOL_LOWUTIL},
    {"DCGM_FI_DEV_RELIABILITY_VIOLATION", S_VIOL_RELIAB},
    {"DCGM_FI_DEV_POWER_MGMT_LIMIT", S_POWER_LIMIT},
    {"DCGM_FI_DEV_PSTATE", S_PSTATE},
    {"DCGM_FI_DEV_FAN_SPEED", S_FAN},
    {"DCGM_FI_DEV_BAR1_TOTAL", S_BAR1_TOTAL},
    {"DCGM_FI_DEV_BAR1_USED", S_BAR1_USED},
    {"DCGM_FI_DEV_PCIE_TX_THROUGHPUT", S_PCIE_TX},
    {"DCGM_FI_PROF_PCIE_TX_BYTES", S_PCIE_TX},
    {"DCGM_FI_DEV_PCIE_RX_THROUGHPUT", S_PCIE_RX},
    {"DCGM_FI_PROF_PCIE_RX_BYTES", S_PCIE_RX},
    {"DCGM_FI_DEV_GET_GPU_RECOVERY_ACTION", S_RECOVERY},
    {"DCGM_FI_PROF_GR_ENGINE_ACTIVE", S_GPM_GR},
    {"DCGM_FI_PROF_SM_ACTIVE", S_GPM_SM},
    {"DCGM_FI_PROF_SM_OCCUPANCY", S_GPM_OCC},
    {"DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", S_GPM_TENSOR},
    {"DCGM_FI_PROF_DRAM_ACTIVE", S_GPM_DRAM},
    {"DCGM_FI_PROF_PIPE_FP64_ACTIVE", S_GPM_FP64},
    {"DCGM_FI_PROF_PIPE_FP32_ACTIVE", S_GPM_FP32},
    {"DCGM_FI_PROF_PIPE_FP16_ACTIVE", S_GPM_FP16},
    {"DCGM_FI_PROF_NVLINK_TX_BYTES", S_GPM_NVL_TX},
    {"DCGM_FI_PROF_NVLINK_RX_BYTES", S_GPM_NVL_RX},
};

/* ------------------------------------------------------------------ time */

double now_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

long long now_us_realtime(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (long long)ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static void abs_deadline(double seconds_from_now, struct timespec *out)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    double s = (double)ts.tv_sec + (double)ts.tv_nsec / 1e9 + seconds_from_now;
    out->tv_sec = (time_t)s;
    out->tv_nsec = (long)((s - (double)out->tv_sec) * 1e9);
    if (out->tv_nsec >= 1000000000L) {
        out->tv_sec += 1;
        out->tv_nsec -= 1000000000L;
    }
}

void cv_wait_for(double seconds)
{
    struct timespec dl;
    abs_deadline(seconds, &dl);
    pthread_cond_timedwait(&g_cv, &g_mu, &dl);
}

__attribute__((constructor)) static void fake_ctor(void)
{
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&g_cv, &a);
    pthread_condattr_destroy(&a);
}

/* ---------------------------------------------------------------- values */

int source_by_name(const char *name)
{
    for (size_t i = 0; i < sizeof(NAMES) / sizeof(NAMES[0]); i++)
        if (strcmp(NAMES[i].name, name) == 0)
            return NAMES[i].src;
    return -1;
}

static int parse_vspec(const cJSON *j, vspec *out)
{
    memset(out, 0, sizeof(*out));
    out->t0 = now_mono();
    if (j == NULL || cJSON_IsNull(j)) {
        out->kind = V_NONE;
        return 0;
    }
    if (cJSON_IsNumber(j)) {
        out->kind = V_CONST;
        out->a = j->valuedouble;
        return 0;
    }
    if (cJSON_IsBool(j)) {
        out->kind = V_CONST;
        out->a = cJSON_IsTrue(j) ? 1 : 0;
        return 0;
    }
    if (!cJSON_IsObject(j))
        return -1;
    const cJSON *x;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "base")) && cJSON_IsNumber(x)) {
        out->kind = V_SINE;
        out->a = x->valuedouble;
        x = cJSON_GetObjectItemCaseSensitive(j, "amplitude");
        out->b = cJSON_IsNumber(x) ? x->valuedouble : 0;
        x = cJSON_GetObjectItemCaseSensitive(j, "period_s");
        out->c = cJSON_IsNumber(x) && x->valuedouble > 0 ? x->valuedouble : 60;
        return 0;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "rate")) && cJSON_IsNumber(x)) {
        out->kind = V_COUNTER;
        out->b = x->valuedouble;
        x = cJSON_GetObjectItemCaseSensitive(j, "start");
        out->a = cJSON_IsNumber(x) ? x->valuedouble : 0;
        return 0;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "value")) && cJSON_IsNumber(x)) {
        out->kind = V_CONST;
        out->a = x->valuedouble;
        return 0;
    }
    return -1;
}

double vs_eval(const vspec *s)
{
    double t = now_mono() - s->t0;
    switch (s->kind) {
    case V_CONST:
        return s->a;
    case V_SINE:
        return s->a + s->b * sin(2.0 * M_PI * t / s->c);
    case V_COUNTER:
        return floor(s->a + s->b * t);
    default:
        return 0;
    }
}

static int mig_blocked(int src)
{
    switch (src) {
    case S_GPU_UTIL:
    case S_MEM_UTIL:
    case S_ENC_UTIL:
    case S_DEC_UTIL:
    case S_REMAP_COR:
    case S_REMAP_UNC:
    case S_REMAP_PEND:
    case S_REMAP_FAIL:
        return 1;
    default:
        return 0;
    }
}

int src_ok(const fake_dev *d, int src)
{
    if (d->v[src].kind == V_NONE)
        return 0;
    if (d->mig_enabled && mig_blocked(src))
        return 0;
    return 1;
}

double src_val(const fake_dev *d, int src) { return vs_eval(&d->v[src]); }

unsigned long long src_u64(const fake_dev *d, int src)
{
    double x = vs_eval(&d->v[src]);
    if (x < 0)
        return 0;
    return (unsigned long long)llround(x);
}

/* -------------------------------------------------------------- counters */

void count_call(const char *sym, int gpu)
{
    int slot = gpu < 0 || gpu >= MAX_DEV ? MAX_DEV : gpu;
    for (int i = 0; i < MAX_SYMS; i++) {
        if (g_counts[i].name == NULL) {
            g_counts[i].name = sym;
            g_counts[i].n[slot]++;
            return;
        }
        if (strcmp(g_counts[i].name, sym) == 0) {
            g_counts[i].n[slot]++;
            return;
        }
    }
}

void count_field(int gpu, unsigned fi)
{
    if (gpu >= 0 && gpu < MAX_DEV && fi < MAX_FI)
        g_fv_counts[gpu][fi]++;
}

static void reset_counters_locked(void)
{
    memset(g_counts, 0, sizeof(g_counts));
    memset(g_fv_counts, 0, sizeof(g_fv_counts));
}

/* Debug exports for tests (present in both builds). */
EXPORT unsigned long long fakenvml_call_count(const char *sym, int gpu)
{
    unsigned long long total = 0;
    pthread_mutex_lock(&g_mu);
    for (int i = 0; i < MAX_SYMS && g_counts[i].name; i++) {
        if (strcmp(g_counts[i].name, sym) != 0)
            continue;
        if (gpu < 0) {
            for (int k = 0; k <= MAX_DEV; k++)
                total += g_counts[i].n[k];
        } else if (gpu < MAX_DEV) {
            total = g_counts[i].n[gpu];
        }
    }
    pthread_mutex_unlock(&g_mu);
    return total;
}

EXPORT unsigned long long fakenvml_field_count(int gpu, unsigned fi)
{
    unsigned long long n = 0;
    pthread_mutex_lock(&g_mu);
    if (gpu >= 0 && gpu < MAX_DEV && fi < MAX_FI)
        n = g_fv_counts[gpu][fi];
    pthread_mutex_unlock(&g_mu);
    return n;
}

EXPORT void fakenvml_reset_counters(void)
{
    pthread_mutex_lock(&g_mu);
    reset_counters_locked();
    pthread_mutex_unlock(&g_mu);
}

/* ------------------------------------------------------------ processes */

/* A scenario "processes" list: [{"pid", "used_memory_mib", "kind", "sm", "mem", "enc", "dec", "sample_us"}].
 * Memory is given in MiB because the driver accounts process memory in whole MiB anyway; NVML reports bytes. Returns the count kept. */
static int parse_procs(const cJSON *list, fake_proc *out, int max)
{
    int n = 0;
    const cJSON *it;
    cJSON_ArrayForEach(it, list)
    {
        const cJSON *pid = cJSON_GetObjectItemCaseSensitive(it, "pid");
        if (!cJSON_IsNumber(pid) || pid->valuedouble <= 0) {
            fprintf(stderr, "fakenvml: process without a positive \"pid\" ignored\n");
            continue;
        }
        if (n >= max) {
            fprintf(stderr, "fakenvml: too many processes (at most %d per device)\n", max);
            break;
        }
        fake_proc *p = &out[n];
        p->pid = (unsigned)pid->valuedouble;
        const cJSON *mem = cJSON_GetObjectItemCaseSensitive(it, "used_memory_mib");
        /* null: the driver cannot say (NVML_VALUE_NOT_AVAILABLE, e.g. under WDDM or without privileges) */
        if (cJSON_IsNull(mem))
            p->used = ~0ULL;
        else
            p->used = cJSON_IsNumber(mem) && mem->valuedouble > 0 ? (unsigned long long)mem->valuedouble << 20 : 0;
        const cJSON *kind = cJSON_GetObjectItemCaseSensitive(it, "kind");
        const char *k = cJSON_IsString(kind) ? kind->valuestring : "compute";
        if (strcmp(k, "compute") == 0)
            p->kinds = PROC_COMPUTE;
        else if (strcmp(k, "graphics") == 0)
            p->kinds = PROC_GRAPHICS;
        else if (strcmp(k, "compute+graphics") == 0)
            p->kinds = PROC_COMPUTE | PROC_GRAPHICS;
        else if (strcmp(k, "mps") == 0)
            p->kinds = PROC_MPS;
        else {
            fprintf(stderr, "fakenvml: process %u: unknown kind %s (ignored)\n", p->pid, k);
            continue;
        }
        static const char *const util_keys[4] = {"sm", "mem", "enc", "dec"};
        p->has_util = 0;
        for (int u = 0; u < 4; u++) {
            const cJSON *v = cJSON_GetObjectItemCaseSensitive(it, util_keys[u]);
            int given = cJSON_IsNumber(v);
            p->util[u] = given && v->valuedouble > 0 ? (unsigned)(v->valuedouble > 100 ? 100 : v->valuedouble) : 0;
            p->has_util |= given;
        }
        const cJSON *at = cJSON_GetObjectItemCaseSensitive(it, "sample_us");
        p->sample_us = cJSON_IsNumber(at) && at->valuedouble > 0 ? (long long)at->valuedouble : 0;
        n++;
    }
    return n;
}

/* ------------------------------------------------------------------ MIG */

static void mig_apply(fake_dev *d, const cJSON *mig)
{
    for (int i = 0; i < d->nmig; i++)
        d->migs[i]->live = 0;
    d->nmig = 0;
    d->mig_capable = 1;
    const cJSON *en = cJSON_GetObjectItemCaseSensitive(mig, "enabled");
    d->mig_enabled = cJSON_IsTrue(en);
    const cJSON *mx = cJSON_GetObjectItemCaseSensitive(mig, "max_devices");
    d->max_mig = cJSON_IsNumber(mx) ? mx->valueint : 7;
    const cJSON *insts = cJSON_GetObjectItemCaseSensitive(mig, "instances");
    const cJSON *it;
    cJSON_ArrayForEach(it, insts)
    {
        if (d->nmig >= MAX_MIG_PER_DEV || g_nmig_pool >= MAX_MIG_POOL) {
            fprintf(stderr, "fakenvml: too many MIG devices\n");
            break;
        }
        fake_mig *m = &g_mig_pool[g_nmig_pool++];
        memset(m, 0, sizeof(*m));
        m->live = 1;
        m->parent = d->cfg_index;
        m->slot = d->nmig;
        const cJSON *x;
        x = cJSON_GetObjectItemCaseSensitive(it, "gi");
        m->gi = cJSON_IsNumber(x) ? (unsigned)x->valueint : (unsigned)d->nmig + 1;
        x = cJSON_GetObjectItemCaseSensitive(it, "ci");
        m->ci = cJSON_IsNumber(x) ? (unsigned)x->valueint : 0;
        x = cJSON_GetObjectItemCaseSensitive(it, "profile");
        snprintf(m->profile, sizeof(m->profile), "%s", cJSON_IsString(x) ? x->valuestring : "1g.10gb");
        x = cJSON_GetObjectItemCaseSensitive(it, "uuid");
        if (cJSON_IsString(x))
            snprintf(m->uuid, sizeof(m->uuid), "%s", x->valuestring);
        else
            snprintf(m->uuid, sizeof(m->uuid), "MIG-00000000-0000-4000-8000-%06d%06d", d->cfg_index, g_nmig_pool);
        const cJSON *mem = cJSON_GetObjectItemCaseSensitive(it, "memory");
        x = cJSON_GetObjectItemCaseSensitive(mem, "total");
        m->mem_total = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : 10ULL << 30;
        x = cJSON_GetObjectItemCaseSensitive(mem, "reserved");
        m->mem_reserved = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : 0;
        x = cJSON_GetObjectItemCaseSensitive(mem, "used");
        m->mem_used = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : 0;
        const cJSON *bar1 = cJSON_GetObjectItemCaseSensitive(it, "bar1");
        x = cJSON_GetObjectItemCaseSensitive(bar1, "total");
        m->bar1_total = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : 32ULL << 30;
        x = cJSON_GetObjectItemCaseSensitive(bar1, "used");
        m->bar1_used = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : 2ULL << 20;
        const cJSON *f;
        cJSON_ArrayForEach(f, cJSON_GetObjectItemCaseSensitive(it, "fields"))
        {
            int s = source_by_name(f->string);
            if (s < S_GPM_FIRST) {
                fprintf(stderr, "fakenvml: MIG instance field %s ignored (only GPM metrics)\n", f->string);
                continue;
            }
            if (parse_vspec(f, &m->gpm[s - S_GPM_FIRST]) == 0)
                m->gpm_set[s - S_GPM_FIRST] = 1;
        }
        m->nproc = parse_procs(cJSON_GetObjectItemCaseSensitive(it, "processes"), m->procs, MAX_MIG_PROCS);
        d->migs[d->nmig++] = m;
    }
}

/* --------------------------------------------------------------- config */

static void set_field(fake_dev *d, const char *name, const cJSON *val)
{
    int s = source_by_name(name);
    if (s < 0) {
        fprintf(stderr, "fakenvml: unknown field %s (ignored)\n", name);
        return;
    }
    if (parse_vspec(val, &d->v[s]) != 0)
        fprintf(stderr, "fakenvml: bad value for %s (ignored)\n", name);
}

static void apply_device(fake_dev *d, const cJSON *j)
{
    const cJSON *x;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "name")) && cJSON_IsString(x))
        snprintf(d->name, sizeof(d->name), "%s", x->valuestring);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "uuid")) && cJSON_IsString(x))
        snprintf(d->uuid, sizeof(d->uuid), "%s", x->valuestring);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "pci_bus_id")) && cJSON_IsString(x))
        snprintf(d->pci, sizeof(d->pci), "%s", x->valuestring);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "pci_device_id")) && cJSON_IsNumber(x))
        d->pci_device_id = (unsigned)x->valuedouble;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "minor")) && cJSON_IsNumber(x))
        d->minor = (unsigned)x->valueint;
    if ((x = cJSON_GetObjectItem(j, "numa_node"))) {
        if (cJSON_IsNumber(x)) {
            d->has_numa = 1;
            d->numa = x->valueint;
        } else {
            d->has_numa = 0;
        }
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "ecc")))
        d->ecc_enabled = cJSON_IsTrue(x);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "gpm_supported")))
        d->gpm_supported = cJSON_IsTrue(x);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "virtualization_mode")) && cJSON_IsNumber(x))
        d->virt_mode = x->valueint;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "persistence_mode")))
        d->persistence = cJSON_IsTrue(x);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "display_mode")))
        d->display_mode = cJSON_IsTrue(x);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "display_active")))
        d->display_active = cJSON_IsTrue(x);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "compute_mode")) && cJSON_IsNumber(x))
        d->compute_mode = x->valueint;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "nvlink_links")) && cJSON_IsNumber(x))
        d->nvlink_links = x->valueint < 0 ? 0 : x->valueint > 18 ? 18 : x->valueint;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "nvlink_version")) && cJSON_IsNumber(x))
        d->nvlink_version = x->valueint;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "cuda_compute_capability")) && cJSON_IsArray(x) &&
        cJSON_GetArraySize(x) == 2) {
        d->cc_major = cJSON_GetArrayItem(x, 0)->valueint;
        d->cc_minor = cJSON_GetArrayItem(x, 1)->valueint;
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "processes")))
        d->nproc = parse_procs(x, d->procs, MAX_PROCS);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "serial")) && cJSON_IsString(x))
        snprintf(d->serial, sizeof(d->serial), "%s", x->valuestring);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "vbios")) && cJSON_IsString(x))
        snprintf(d->vbios, sizeof(d->vbios), "%s", x->valuestring);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "brand")) && cJSON_IsNumber(x))
        d->brand = x->valueint;
    const cJSON *inforom = cJSON_GetObjectItemCaseSensitive(j, "inforom");
    if (cJSON_IsObject(inforom)) {
        if ((x = cJSON_GetObjectItemCaseSensitive(inforom, "oem")) && cJSON_IsString(x))
            snprintf(d->inforom_oem, sizeof(d->inforom_oem), "%s", x->valuestring);
        if ((x = cJSON_GetObjectItemCaseSensitive(inforom, "ecc")) && cJSON_IsString(x))
            snprintf(d->inforom_ecc, sizeof(d->inforom_ecc), "%s", x->valuestring);
        if ((x = cJSON_GetObjectItemCaseSensitive(inforom, "power")) && cJSON_IsString(x))
            snprintf(d->inforom_power, sizeof(d->inforom_power), "%s", x->valuestring);
        if ((x = cJSON_GetObjectItemCaseSensitive(inforom, "image")) && cJSON_IsString(x))
            snprintf(d->inforom_image, sizeof(d->inforom_image), "%s", x->valuestring);
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "supported_events")) && cJSON_IsNumber(x)) {
        d->supported_events = (unsigned long long)x->valuedouble;
        d->supported_events_set = 1;
    }
    const cJSON *mem = cJSON_GetObjectItemCaseSensitive(j, "memory");
    if (cJSON_IsObject(mem)) {
        if ((x = cJSON_GetObjectItemCaseSensitive(mem, "total")))
            parse_vspec(x, &d->v[S_FB_TOTAL]);
        if ((x = cJSON_GetObjectItemCaseSensitive(mem, "reserved")))
            parse_vspec(x, &d->v[S_FB_RESERVED]);
        if ((x = cJSON_GetObjectItemCaseSensitive(mem, "used")))
            parse_vspec(x, &d->v[S_FB_USED]);
    }
    const cJSON *bar1 = cJSON_GetObjectItemCaseSensitive(j, "bar1");
    if (cJSON_IsObject(bar1)) {
        if ((x = cJSON_GetObjectItemCaseSensitive(bar1, "total")))
            parse_vspec(x, &d->v[S_BAR1_TOTAL]);
        if ((x = cJSON_GetObjectItemCaseSensitive(bar1, "used")))
            parse_vspec(x, &d->v[S_BAR1_USED]);
    }
    const cJSON *fields = cJSON_GetObjectItemCaseSensitive(j, "fields");
    const cJSON *f;
    cJSON_ArrayForEach(f, fields) set_field(d, f->string, f);
    const cJSON *ns = cJSON_GetObjectItemCaseSensitive(j, "not_supported");
    cJSON_ArrayForEach(f, ns)
    {
        if (cJSON_IsString(f)) {
            int s = source_by_name(f->valuestring);
            if (s >= 0)
                d->v[s].kind = V_NONE;
            else
                fprintf(stderr, "fakenvml: unknown field %s in not_supported\n", f->valuestring);
        }
    }
    const cJSON *peers = cJSON_GetObjectItemCaseSensitive(j, "nvlink_peers");
    if (cJSON_IsArray(peers)) {
        memset(d->nvlink_peer, 0, sizeof(d->nvlink_peer));
        memset(d->nvlink_width, 0, sizeof(d->nvlink_width));
        cJSON_ArrayForEach(f, peers)
        {
            if (cJSON_IsNumber(f) && f->valueint >= 0 && f->valueint < MAX_DEV)
                d->nvlink_peer[f->valueint] = 1;
        }
    } else if (cJSON_IsObject(peers)) {
        /* {"<peer position>": <links>}: link widths per peer, e.g. a DGX-1's hybrid cube mesh */
        memset(d->nvlink_peer, 0, sizeof(d->nvlink_peer));
        memset(d->nvlink_width, 0, sizeof(d->nvlink_width));
        cJSON_ArrayForEach(f, peers)
        {
            char *end = NULL;
            long b = strtol(f->string, &end, 10);
            if (end == f->string || *end || b < 0 || b >= MAX_DEV || !cJSON_IsNumber(f) || f->valueint <= 0)
                continue;
            d->nvlink_peer[b] = 1;
            d->nvlink_width[b] = (unsigned char)(f->valueint > 18 ? 18 : f->valueint);
        }
    }
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "nvlink_switch")))
        d->nvlink_switch = cJSON_IsTrue(x);
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "pcie_switch")) && cJSON_IsNumber(x))
        d->pcie_switch = x->valueint;
    if ((x = cJSON_GetObjectItemCaseSensitive(j, "pcie_root")) && cJSON_IsNumber(x))
        d->pcie_root = x->valueint;
    const cJSON *mig = cJSON_GetObjectItemCaseSensitive(j, "mig");
    if (cJSON_IsObject(mig))
        mig_apply(d, mig);
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 4096, n = 0;
    char *buf = malloc(cap);
    for (;;) {
        if (n + 4096 > cap) {
            cap *= 2;
            buf = realloc(buf, cap);
        }
        size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0)
            break;
    }
    fclose(f);
    buf[n] = 0;
    if (len)
        *len = n;
    return buf;
}

static void reset_state_locked(void)
{
    for (int i = 0; i < MAX_SETS; i++)
        g_sets[i].live = 0;
    memset(g_dev, 0, sizeof(g_dev));
    memset(g_mig_pool, 0, sizeof(g_mig_pool));
    memset(g_rules, 0, sizeof(g_rules));
    g_ndev = 0;
    g_nmig_pool = 0;
    g_nvlink_all = 0;
    g_nvlink_fabric = 0;
    g_pcie_matrix = 0;
    g_control_off = 0;
    g_control_path[0] = 0;
    free(g_partial);
    g_partial = NULL;
    g_partial_len = 0;
    g_epoch++;
    pthread_cond_broadcast(&g_cv);
}

nvmlReturn_t load_config_locked(void)
{
    reset_state_locked();
    reset_counters_locked();
    const char *ctl = getenv("FAKENVML_CONTROL");
    if (ctl && *ctl)
        snprintf(g_control_path, sizeof(g_control_path), "%s", ctl);
    const char *path = getenv("FAKENVML_CONFIG");
    if (!path || !*path) {
        fprintf(stderr, "fakenvml: FAKENVML_CONFIG not set: behaving as 'driver not loaded'\n");
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    char *text = read_file(path, NULL);
    if (!text) {
        fprintf(stderr, "fakenvml: cannot read %s: %s\n", path, strerror(errno));
        return NVML_ERROR_DRIVER_NOT_LOADED;
    }
    cJSON *root = cJSON_Parse(text);
    free(text);
    if (!root || !cJSON_IsObject(root)) {
        fprintf(stderr, "fakenvml: %s is not a JSON object\n", path);
        cJSON_Delete(root);
        return NVML_ERROR_UNKNOWN;
    }
    const cJSON *x;
    nvmlReturn_t ret = NVML_SUCCESS;
    if ((x = cJSON_GetObjectItemCaseSensitive(root, "init_error")) && cJSON_IsNumber(x))
        ret = x->valueint;
    x = cJSON_GetObjectItemCaseSensitive(root, "driver_version");
    snprintf(g_driver, sizeof(g_driver), "%s", cJSON_IsString(x) ? x->valuestring : "550.54.15");
    x = cJSON_GetObjectItemCaseSensitive(root, "nvml_version");
    if (cJSON_IsString(x))
        snprintf(g_nvml_version, sizeof(g_nvml_version), "%s", x->valuestring);
    else
        snprintf(g_nvml_version, sizeof(g_nvml_version), "12.%s", g_driver);
    x = cJSON_GetObjectItemCaseSensitive(root, "cuda_driver_version");
    g_cuda_version = cJSON_IsNumber(x) ? x->valueint : 12040;
    x = cJSON_GetObjectItemCaseSensitive(root, "nvlink");
    g_nvlink_all = cJSON_IsString(x) && strcmp(x->valuestring, "all") == 0;
    g_nvlink_fabric = cJSON_IsString(x) && strcmp(x->valuestring, "switch") == 0;

    const cJSON *defaults = cJSON_GetObjectItemCaseSensitive(root, "defaults");
    const cJSON *devs = cJSON_GetObjectItemCaseSensitive(root, "devices");
    const cJSON *dj;
    cJSON_ArrayForEach(dj, devs)
    {
        if (g_ndev >= MAX_DEV)
            break;
        fake_dev *d = &g_dev[g_ndev];
        d->cfg_index = g_ndev;
        d->minor = (unsigned)g_ndev;
        d->ecc_enabled = 1;
        d->pci_device_id = 0x233010DE;
        d->pci_subsys = 0x16C110DE;
        snprintf(d->name, sizeof(d->name), "NVIDIA H100 80GB HBM3");
        snprintf(d->uuid, sizeof(d->uuid), "GPU-00000000-0000-4000-8000-0000000000%02d", g_ndev);
        snprintf(d->pci, sizeof(d->pci), "00000000:%02X:00.0", 0x10 + g_ndev);
        d->nvlink_links = -1;
        d->nvlink_version = 4;
        d->nvlink_switch = g_nvlink_fabric;
        d->pcie_switch = -1;
        d->pcie_root = -1;
        d->persistence = 1; /* GPU nodes run nvidia-persistenced */
        d->cc_major = 9;
        d->cc_minor = 0;
        /* An H100 SXM board's facts as nvidia-smi -q shows them; the serial differs per GPU. */
        snprintf(d->serial, sizeof(d->serial), "16509230%05d", 1000 + g_ndev);
        snprintf(d->vbios, sizeof(d->vbios), "96.00.99.00.01");
        snprintf(d->inforom_oem, sizeof(d->inforom_oem), "2.1");
        snprintf(d->inforom_ecc, sizeof(d->inforom_ecc), "7.16");
        snprintf(d->inforom_image, sizeof(d->inforom_image), "G520.0200.00.05");
        d->brand = 14; /* NVML_BRAND_NVIDIA; no power inforom object on H100: NOT_SUPPORTED */
        for (int s = 0; s < S_COUNT; s++)
            d->v[s].kind = V_NONE;
        if (cJSON_IsObject(defaults))
            apply_device(d, defaults);
        apply_device(d, dj);
        if (!d->supported_events_set) {
            d->supported_events = EV_PSTATE | EV_XID;
            if (d->v[S_ECC_SBE_VOL].kind != V_NONE && d->ecc_enabled)
                d->supported_events |= EV_SBE | EV_DBE;
            if (d->mig_capable)
                d->supported_events |= EV_MIG;
        }
        g_ndev++;
    }
    if (g_nvlink_all) {
        for (int a = 0; a < g_ndev; a++)
            for (int b = 0; b < g_ndev; b++)
                if (a != b)
                    g_dev[a].nvlink_peer[b] = 1;
    }
    /* GPUs on one NVSwitch fabric reach each other over NVLink (P2P status OK) */
    for (int a = 0; a < g_ndev; a++)
        for (int b = 0; b < g_ndev; b++)
            if (a != b && g_dev[a].nvlink_switch && g_dev[b].nvlink_switch)
                g_dev[a].nvlink_peer[b] = 1;
    for (int a = 0; a < g_ndev; a++)
        for (int b = 0; b < g_ndev; b++)
            if (g_dev[a].nvlink_peer[b]) {
                g_dev[b].nvlink_peer[a] = 1;
                if (g_dev[a].nvlink_width[b] && !g_dev[b].nvlink_width[a])
                    g_dev[b].nvlink_width[a] = g_dev[a].nvlink_width[b];
            }
    /* 18 links (NVLink 4 on an H100 SXM) unless the scenario says otherwise: the per-link field values
     * and the link count nvitop-exporter sums over agree with "nvlink"/"nvlink_peers". With link widths
     * for every peer, the links are their sum. */
    for (int a = 0; a < g_ndev; a++) {
        if (g_dev[a].nvlink_links >= 0)
            continue;
        int peers = 0, shared = 0, widths = 0;
        for (int b = 0; b < g_ndev; b++)
            if (g_dev[a].nvlink_peer[b]) {
                peers++;
                shared += !g_dev[a].nvlink_width[b];
                widths += g_dev[a].nvlink_width[b];
            }
        g_dev[a].nvlink_links = g_dev[a].nvlink_switch || shared ? (peers ? 18 : 0) : widths > 18 ? 18 : widths;
    }
    /* "pcie_topology": [[level, ...], ...] by device position (nvmlGpuTopologyLevel_t: 0, 10, ..., 50) */
    const cJSON *matrix = cJSON_GetObjectItemCaseSensitive(root, "pcie_topology");
    if (cJSON_IsArray(matrix)) {
        g_pcie_matrix = 1;
        for (int a = 0; a < MAX_DEV; a++)
            for (int b = 0; b < MAX_DEV; b++)
                g_pcie_level[a][b] = -1;
        int a = 0;
        const cJSON *row, *cell;
        cJSON_ArrayForEach(row, matrix)
        {
            int b = 0;
            cJSON_ArrayForEach(cell, row)
            {
                if (a < MAX_DEV && b < MAX_DEV && cJSON_IsNumber(cell))
                    g_pcie_level[a][b] = cell->valueint;
                b++;
            }
            a++;
        }
    }
    cJSON_Delete(root);
    if (ret == NVML_SUCCESS)
        control_poll_locked();
    return ret;
}

void shutdown_locked(void) { reset_state_locked(); }

/* ---------------------------------------------------------------- events */

static void push_event(int gpu, unsigned long long type, unsigned long long data, unsigned gi, unsigned ci)
{
    if (gpu < 0 || gpu >= g_ndev)
        return;
    for (int i = 0; i < MAX_SETS; i++) {
        evset *s = &g_sets[i];
        if (!s->live || !s->registered[gpu] || !(s->mask[gpu] & type))
            continue;
        if (s->count >= EVQ) {
            fprintf(stderr, "fakenvml: event queue full, dropping\n");
            continue;
        }
        evrec *e = &s->q[(s->head + s->count) % EVQ];
        e->gpu = gpu;
        e->type = type;
        e->data = data;
        e->gi = gi;
        e->ci = ci;
        s->count++;
    }
    pthread_cond_broadcast(&g_cv);
}

/* ----------------------------------------------------------------- rules */

static int sym_matches(const char *rule_call, const char *sym)
{
    if (strcmp(rule_call, sym) == 0)
        return 1;
    size_t n = strlen(rule_call);
    /* "nvmlDevice*" matches every symbol starting with "nvmlDevice"; "*" matches every call */
    if (n > 0 && rule_call[n - 1] == '*')
        return strncmp(rule_call, sym, n - 1) == 0;
    /* "nvmlDeviceGetCount" also matches "nvmlDeviceGetCount_v2" */
    if (strncmp(rule_call, sym, n) == 0 && sym[n] == '_' && sym[n + 1] == 'v')
        return 1;
    return 0;
}

rule *find_rule(int kind, const char *sym, int gpu)
{
    for (int i = 0; i < MAX_RULES; i++) {
        rule *r = &g_rules[i];
        if (!r->used || r->kind != kind)
            continue;
        if (r->gpu >= 0 && gpu >= 0 && r->gpu != gpu)
            continue;
        if (!sym_matches(r->call, sym))
            continue;
        return r;
    }
    return NULL;
}

void consume_rule(rule *r)
{
    if (r->remaining > 0 && --r->remaining == 0)
        r->used = 0;
}

static void add_rule(int kind, int gpu, const char *call, int code, double seconds, long count)
{
    for (int i = 0; i < MAX_RULES; i++) {
        if (!g_rules[i].used) {
            rule *r = &g_rules[i];
            r->used = 1;
            r->kind = kind;
            r->gpu = gpu;
            snprintf(r->call, sizeof(r->call), "%s", call);
            r->code = code;
            r->seconds = seconds;
            r->remaining = count;
            return;
        }
    }
    fprintf(stderr, "fakenvml: too many rules\n");
}

static void drop_rules(int kind, int gpu, const char *call)
{
    for (int i = 0; i < MAX_RULES; i++) {
        rule *r = &g_rules[i];
        if (!r->used || (kind && r->kind != kind))
            continue;
        if (gpu >= 0 && r->gpu != gpu)
            continue;
        if (call && strcmp(r->call, call) != 0)
            continue;
        r->used = 0;
    }
}

/* --------------------------------------------------------------- control */

static int jint(const cJSON *o, const char *key, int dflt)
{
    const cJSON *x = cJSON_GetObjectItemCaseSensitive(o, key);
    return cJSON_IsNumber(x) ? x->valueint : dflt;
}

static void release_hangs(fake_dev *d)
{
    d->hang_gen++;
    pthread_cond_broadcast(&g_cv);
}

static void apply_op(const char *line)
{
    cJSON *o = cJSON_Parse(line);
    const cJSON *opj = cJSON_GetObjectItemCaseSensitive(o, "op");
    if (!o || !cJSON_IsString(opj)) {
        fprintf(stderr, "fakenvml: bad control line: %s\n", line);
        cJSON_Delete(o);
        return;
    }
    const char *op = opj->valuestring;
    int gpu = jint(o, "gpu", -1);
    fake_dev *d = gpu >= 0 && gpu < g_ndev ? &g_dev[gpu] : NULL;
    const cJSON *callj = cJSON_GetObjectItemCaseSensitive(o, "call");
    const char *call = cJSON_IsString(callj) ? callj->valuestring : NULL;
    const cJSON *x;

    if (strcmp(op, "xid") == 0 || strcmp(op, "event") == 0) {
        unsigned long long type = EV_XID, data = (unsigned long long)jint(o, "xid", 999);
        if (op[0] == 'e') {
            x = cJSON_GetObjectItemCaseSensitive(o, "type");
            type = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : EV_XID;
            x = cJSON_GetObjectItemCaseSensitive(o, "data");
            data = cJSON_IsNumber(x) ? (unsigned long long)x->valuedouble : 0;
        }
        unsigned gi = (unsigned)jint(o, "gi", -1), ci = (unsigned)jint(o, "ci", -1);
        if (cJSON_GetObjectItemCaseSensitive(o, "gi") && !cJSON_GetObjectItemCaseSensitive(o, "ci"))
            ci = NO_ID;
        push_event(gpu, type, data, gi, ci);
    } else if (strcmp(op, "lost") == 0 && d) {
        d->lost = 1;
        pthread_cond_broadcast(&g_cv);
    } else if (strcmp(op, "recover") == 0 && d) {
        d->lost = 0;
        d->vanished = 0;
        drop_rules(0, gpu, NULL);
        release_hangs(d);
    } else if (strcmp(op, "vanish") == 0 && d) {
        d->vanished = 1;
        pthread_cond_broadcast(&g_cv);
    } else if (strcmp(op, "hang") == 0 && call) {
        x = cJSON_GetObjectItemCaseSensitive(o, "seconds");
        double secs = cJSON_IsNumber(x) ? x->valuedouble : 3600;
        if (secs <= 0) {
            drop_rules(RULE_HANG, gpu, call);
            if (d)
                release_hangs(d);
            else
                for (int i = 0; i < g_ndev; i++)
                    release_hangs(&g_dev[i]);
        } else {
            add_rule(RULE_HANG, gpu, call, 0, secs, jint(o, "count", -1));
        }
    } else if (strcmp(op, "error") == 0 && call) {
        add_rule(RULE_ERROR, gpu, call, jint(o, "code", NVML_ERROR_UNKNOWN), 0, jint(o, "count", 1));
    } else if (strcmp(op, "clear") == 0) {
        drop_rules(0, gpu, call);
        for (int i = 0; i < g_ndev; i++)
            if (gpu < 0 || i == gpu)
                release_hangs(&g_dev[i]);
    } else if (strcmp(op, "set") == 0 && d) {
        x = cJSON_GetObjectItemCaseSensitive(o, "field");
        if (cJSON_IsString(x))
            set_field(d, x->valuestring, cJSON_GetObjectItemCaseSensitive(o, "value"));
    } else if (strcmp(op, "processes") == 0 && d) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(o, "processes");
        x = cJSON_GetObjectItemCaseSensitive(o, "gi");
        if (cJSON_IsNumber(x)) {
            for (int i = 0; i < d->nmig; i++)
                if (d->migs[i]->gi == (unsigned)x->valueint)
                    d->migs[i]->nproc = parse_procs(list, d->migs[i]->procs, MAX_MIG_PROCS);
        } else {
            d->nproc = parse_procs(list, d->procs, MAX_PROCS);
        }
    } else if (strcmp(op, "mig") == 0 && d) {
        mig_apply(d, o);
        d->supported_events |= EV_MIG;
        push_event(gpu, EV_MIG, 0, NO_ID, NO_ID);
    } else {
        fprintf(stderr, "fakenvml: unknown or incomplete control op: %s\n", line);
    }
    cJSON_Delete(o);
}

void control_poll_locked(void)
{
    if (!g_control_path[0])
        return;
    int fd = open(g_control_path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return;
    }
    if (st.st_size < g_control_off) { /* truncated: start over */
        g_control_off = 0;
        g_partial_len = 0;
    }
    if (st.st_size == g_control_off) {
        close(fd);
        return;
    }
    size_t want = (size_t)(st.st_size - g_control_off);
    g_partial = realloc(g_partial, g_partial_len + want + 1);
    ssize_t got = pread(fd, g_partial + g_partial_len, want, g_control_off);
    close(fd);
    if (got <= 0)
        return;
    g_control_off += got;
    g_partial_len += (size_t)got;
    g_partial[g_partial_len] = 0;
    char *start = g_partial;
    char *nl;
    while ((nl = memchr(start, '\n', g_partial_len - (size_t)(start - g_partial))) != NULL) {
        *nl = 0;
        if (nl > start)
            apply_op(start);
        start = nl + 1;
    }
    size_t rest = g_partial_len - (size_t)(start - g_partial);
    memmove(g_partial, start, rest);
    g_partial_len = rest;
}
