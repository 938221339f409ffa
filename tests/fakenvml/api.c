/* Fake NVML: the exported C API (signatures as in nvml.h).
 *
 * Every device call goes through enter(): checks init, polls the control
 * file, resolves the handle, counts the call, applies lost/error/hang rules,
 * and returns with g_mu held on success (the body then reads state and
 * unlocks through OUT()). Hangs wait on a condition variable, so a hung call
 * never holds the lock and blocks only its own thread.
 *
 * Built with -DFAKE_OLD_DRIVER (build/old), the library has exactly the symbol
 * set of an R470 libnvidia-ml.so (NVML 11.4 nvml.h): the newer symbols listed
 * in README.md are not compiled in, so a binding sees FunctionNotFound exactly
 * as with that driver. -DFAKE_PRE_R450 (build/r418) also drops the _v2/_v3
 * forms NVML declares since R450 (HAVE_R450_SYMS), so that the exporter's
 * fallbacks for drivers older than R450 stay tested.
 */
#define _GNU_SOURCE
#include "state.h"

#if defined(FAKE_PRE_R450) && !defined(FAKE_OLD_DRIVER)
#define FAKE_OLD_DRIVER
#endif
#ifndef FAKE_PRE_R450
#define HAVE_R450_SYMS 1
#endif

#include <stdint.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>

#define F_MIG_OK 1
#define F_NOHANDLE 2

typedef struct {
    fake_dev *d;
    fake_mig *m;
    int gpu;
} target;

#define OUT(ret)                                                                                                    \
    do {                                                                                                            \
        nvmlReturn_t rr_ = (ret);                                                                                   \
        pthread_mutex_unlock(&g_mu);                                                                                \
        return rr_;                                                                                                 \
    } while (0)

#define ENTER(h, flags)                                                                                             \
    target T;                                                                                                       \
    do {                                                                                                            \
        nvmlReturn_t r_ = enter(__func__, (h), &T, (flags));                                                        \
        if (r_ != NVML_SUCCESS)                                                                                     \
            return r_;                                                                                              \
    } while (0)

static nvmlReturn_t resolve(void *h, target *t)
{
    t->d = NULL;
    t->m = NULL;
    t->gpu = -1;
    if (h == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    uintptr_t p = (uintptr_t)h;
    uintptr_t db = (uintptr_t)&g_dev[0], de = (uintptr_t)&g_dev[MAX_DEV];
    uintptr_t mb = (uintptr_t)&g_mig_pool[0], me = (uintptr_t)&g_mig_pool[MAX_MIG_POOL];
    if (p >= db && p < de) {
        if ((p - db) % sizeof(fake_dev) != 0)
            return NVML_ERROR_INVALID_ARGUMENT;
        size_t idx = (p - db) / sizeof(fake_dev);
        if ((int)idx >= g_ndev)
            return NVML_ERROR_INVALID_ARGUMENT;
        t->d = &g_dev[idx];
    } else if (p >= mb && p < me) {
        if ((p - mb) % sizeof(fake_mig) != 0)
            return NVML_ERROR_INVALID_ARGUMENT;
        fake_mig *m = &g_mig_pool[(p - mb) / sizeof(fake_mig)];
        t->d = &g_dev[m->parent];
        t->gpu = m->parent;
        if (!m->live)
            return NVML_ERROR_INVALID_ARGUMENT; /* stale handle after a MIG reconfiguration */
        t->m = m;
    } else {
        return NVML_ERROR_INVALID_ARGUMENT;
    }
    t->gpu = t->d->cfg_index;
    return NVML_SUCCESS;
}

/* lock held; may wait on g_cv (which releases the lock) */
static nvmlReturn_t gate(const char *sym, target *t, int flags)
{
    if (t->d && (t->d->lost || t->d->vanished))
        return NVML_ERROR_GPU_IS_LOST;
    rule *r = find_rule(RULE_ERROR, sym, t->gpu);
    if (r) {
        int code = r->code;
        consume_rule(r);
        return code;
    }
    r = find_rule(RULE_HANG, sym, t->gpu);
    if (r) {
        double end = now_mono() + r->seconds;
        consume_rule(r);
        unsigned epoch = g_epoch;
        unsigned gen = t->d ? t->d->hang_gen : 0;
        for (;;) {
            double now = now_mono();
            if (now >= end || g_epoch != epoch || (t->d && t->d->hang_gen != gen))
                break;
            double slice = end - now;
            cv_wait_for(slice > 0.005 ? 0.005 : slice);
            control_poll_locked(); /* a "recover"/"clear"/"hang seconds 0" op releases the wait */
        }
        if (g_epoch != epoch || !g_refcount)
            return NVML_ERROR_UNINITIALIZED;
        if (t->d && (t->d->lost || t->d->vanished))
            return NVML_ERROR_GPU_IS_LOST;
    }
    if (t->m && !(flags & F_MIG_OK))
        return NVML_ERROR_NOT_SUPPORTED;
    return NVML_SUCCESS;
}

static nvmlReturn_t enter(const char *sym, void *h, target *t, int flags)
{
    pthread_mutex_lock(&g_mu);
    if (!g_refcount) {
        count_call(sym, -1);
        OUT(NVML_ERROR_UNINITIALIZED);
    }
    control_poll_locked();
    nvmlReturn_t r = NVML_SUCCESS;
    if (flags & F_NOHANDLE) {
        t->d = NULL;
        t->m = NULL;
        t->gpu = -1;
    } else {
        r = resolve(h, t);
    }
    count_call(sym, t->gpu);
    if (r == NVML_SUCCESS)
        r = gate(sym, t, flags);
    if (r != NVML_SUCCESS)
        OUT(r);
    return NVML_SUCCESS;
}

static int visible_count(void)
{
    int n = 0;
    for (int i = 0; i < g_ndev; i++)
        if (!g_dev[i].vanished)
            n++;
    return n;
}

static fake_dev *visible_at(unsigned idx)
{
    unsigned n = 0;
    for (int i = 0; i < g_ndev; i++) {
        if (g_dev[i].vanished)
            continue;
        if (n == idx)
            return &g_dev[i];
        n++;
    }
    return NULL;
}

static nvmlReturn_t copy_str(char *dst, unsigned len, const char *src)
{
    if (dst == NULL)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (strlen(src) + 1 > len)
        return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(dst, src, strlen(src) + 1);
    return NVML_SUCCESS;
}

/* ------------------------------------------------------------ lifecycle */

EXPORT nvmlReturn_t nvmlInitWithFlags(unsigned int flags)
{
    (void)flags;
    pthread_mutex_lock(&g_mu);
    if (g_refcount == 0) {
        nvmlReturn_t r = load_config_locked();
        if (r != NVML_SUCCESS) {
            shutdown_locked();
            OUT(r);
        }
    }
    g_refcount++;
    count_call(__func__, -1);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlInit_v2(void) { return nvmlInitWithFlags(0); }
EXPORT nvmlReturn_t nvmlInit(void) { return nvmlInitWithFlags(0); }

EXPORT nvmlReturn_t nvmlShutdown(void)
{
    pthread_mutex_lock(&g_mu);
    if (g_refcount == 0)
        OUT(NVML_ERROR_UNINITIALIZED);
    if (--g_refcount == 0)
        shutdown_locked();
    OUT(NVML_SUCCESS);
}

EXPORT const char *nvmlErrorString(nvmlReturn_t r)
{
    switch (r) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NO_PERMISSION: return "Insufficient Permissions";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_DRIVER_NOT_LOADED: return "Driver Not Loaded";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_FUNCTION_NOT_FOUND: return "Function Not Found";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_RESET_REQUIRED: return "GPU requires restart";
    case NVML_ERROR_NO_DATA: return "No data";
    case NVML_ERROR_ARGUMENT_VERSION_MISMATCH: return "Argument version mismatch";
    default: return "Unknown Error";
    }
}

/* --------------------------------------------------------------- system */

EXPORT nvmlReturn_t nvmlSystemGetDriverVersion(char *version, unsigned int length)
{
    ENTER(NULL, F_NOHANDLE);
    OUT(copy_str(version, length, g_driver));
}

EXPORT nvmlReturn_t nvmlSystemGetNVMLVersion(char *version, unsigned int length)
{
    ENTER(NULL, F_NOHANDLE);
    OUT(copy_str(version, length, g_nvml_version));
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion(int *v)
{
    ENTER(NULL, F_NOHANDLE);
    *v = g_cuda_version;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlSystemGetCudaDriverVersion_v2(int *v)
{
    ENTER(NULL, F_NOHANDLE);
    *v = g_cuda_version;
    OUT(NVML_SUCCESS);
}

/* ------------------------------------------------------------ enumeration */

static nvmlReturn_t count_impl(const char *sym, unsigned int *count)
{
    target T;
    nvmlReturn_t r = enter(sym, NULL, &T, F_NOHANDLE);
    if (r)
        return r;
    if (!count)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned)visible_count();
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCount(unsigned int *count) { return count_impl(__func__, count); }
#ifdef HAVE_R450_SYMS
EXPORT nvmlReturn_t nvmlDeviceGetCount_v2(unsigned int *count) { return count_impl(__func__, count); }
#endif

static nvmlReturn_t by_index_impl(const char *sym, unsigned int index, void **device)
{
    pthread_mutex_lock(&g_mu);
    if (!g_refcount)
        OUT(NVML_ERROR_UNINITIALIZED);
    control_poll_locked();
    fake_dev *d = visible_at(index);
    count_call(sym, d ? d->cfg_index : -1);
    if (!d || !device)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    target T = {d, NULL, d->cfg_index};
    nvmlReturn_t r = gate(sym, &T, 0);
    if (r == NVML_SUCCESS)
        *device = d;
    OUT(r);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex(unsigned int index, void **device)
{
    return by_index_impl(__func__, index, device);
}
#ifdef HAVE_R450_SYMS
EXPORT nvmlReturn_t nvmlDeviceGetHandleByIndex_v2(unsigned int index, void **device)
{
    return by_index_impl(__func__, index, device);
}
#endif

EXPORT nvmlReturn_t nvmlDeviceGetHandleByUUID(const char *uuid, void **device)
{
    ENTER(NULL, F_NOHANDLE);
    if (!uuid || !device)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < g_ndev; i++) {
        fake_dev *d = &g_dev[i];
        if (d->vanished)
            continue;
        if (strcmp(d->uuid, uuid) == 0) {
            if (d->lost)
                OUT(NVML_ERROR_GPU_IS_LOST);
            *device = d;
            OUT(NVML_SUCCESS);
        }
        for (int k = 0; k < d->nmig; k++) {
            if (strcmp(d->migs[k]->uuid, uuid) == 0) {
                if (d->lost)
                    OUT(NVML_ERROR_GPU_IS_LOST);
                *device = d->migs[k];
                OUT(NVML_SUCCESS);
            }
        }
    }
    OUT(NVML_ERROR_NOT_FOUND);
}

EXPORT nvmlReturn_t nvmlDeviceGetUUID(void *device, char *uuid, unsigned int length)
{
    ENTER(device, F_MIG_OK);
    OUT(copy_str(uuid, length, T.m ? T.m->uuid : T.d->uuid));
}

EXPORT nvmlReturn_t nvmlDeviceGetName(void *device, char *name, unsigned int length)
{
    ENTER(device, F_MIG_OK);
    char buf[160];
    if (T.m)
        snprintf(buf, sizeof(buf), "%s MIG %s", T.d->name, T.m->profile);
    else
        snprintf(buf, sizeof(buf), "%s", T.d->name);
    OUT(copy_str(name, length, buf));
}

/* Label-field facts: a string the scenario leaves empty is NOT_SUPPORTED, as on boards without it. */
static nvmlReturn_t fact_str(char *dst, unsigned len, const char *value)
{
    return value[0] ? copy_str(dst, len, value) : NVML_ERROR_NOT_SUPPORTED;
}

EXPORT nvmlReturn_t nvmlDeviceGetSerial(void *device, char *serial, unsigned int length)
{
    ENTER(device, 0);
    OUT(fact_str(serial, length, T.d->serial));
}

EXPORT nvmlReturn_t nvmlDeviceGetVbiosVersion(void *device, char *version, unsigned int length)
{
    ENTER(device, 0);
    OUT(fact_str(version, length, T.d->vbios));
}

EXPORT nvmlReturn_t nvmlDeviceGetInforomVersion(void *device, int object, char *version, unsigned int length)
{
    ENTER(device, 0);
    const char *value = object == 0 ? T.d->inforom_oem : object == 1 ? T.d->inforom_ecc
                      : object == 2 ? T.d->inforom_power : "";
    OUT(fact_str(version, length, value));
}

EXPORT nvmlReturn_t nvmlDeviceGetInforomImageVersion(void *device, char *version, unsigned int length)
{
    ENTER(device, 0);
    OUT(fact_str(version, length, T.d->inforom_image));
}

EXPORT nvmlReturn_t nvmlDeviceGetBrand(void *device, int *brand)
{
    ENTER(device, 0);
    if (brand == NULL)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (T.d->brand < 0)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    *brand = T.d->brand;
    OUT(NVML_SUCCESS);
}

/* nvmlDeviceAttributes_t (nvml.h); NVML answers it for MIG device handles only. */
typedef struct {
    unsigned int multiprocessorCount, sharedCopyEngineCount, sharedDecoderCount, sharedEncoderCount;
    unsigned int sharedJpegCount, sharedOfaCount, gpuInstanceSliceCount, computeInstanceSliceCount;
    unsigned long long memorySizeMB;
} fake_attributes;

EXPORT nvmlReturn_t nvmlDeviceGetAttributes_v2(void *device, fake_attributes *attrs)
{
    ENTER(device, F_MIG_OK);
    if (attrs == NULL)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (!T.m)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    unsigned slices = (unsigned)strtoul(T.m->profile, NULL, 10); /* "3g.40gb" -> 3 */
    memset(attrs, 0, sizeof(*attrs));
    attrs->multiprocessorCount = slices * 16;
    attrs->sharedCopyEngineCount = slices;
    attrs->gpuInstanceSliceCount = slices;
    attrs->computeInstanceSliceCount = slices;
    attrs->memorySizeMB = T.m->mem_total >> 20;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetIndex(void *device, unsigned int *index)
{
    ENTER(device, 0);
    unsigned n = 0;
    for (int i = 0; i < T.d->cfg_index; i++)
        if (!g_dev[i].vanished)
            n++;
    *index = n;
    OUT(NVML_SUCCESS);
}

static void fill_pci(const fake_dev *d, nvmlPciInfo_t *p)
{
    unsigned dom = 0, bus = 0, dev = 0, fn = 0;
    sscanf(d->pci, "%x:%x:%x.%x", &dom, &bus, &dev, &fn);
    memset(p, 0, sizeof(*p));
    snprintf(p->busIdLegacy, sizeof(p->busIdLegacy), "%04X:%02X:%02X.0", dom, bus, dev);
    snprintf(p->busId, sizeof(p->busId), "%s", d->pci);
    p->domain = dom;
    p->bus = bus;
    p->device = dev;
    p->pciDeviceId = d->pci_device_id;
    p->pciSubSystemId = d->pci_subsys;
}

#ifdef HAVE_R450_SYMS
EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v3(void *device, nvmlPciInfo_t *pci)
{
    ENTER(device, 0);
    fill_pci(T.d, pci);
    OUT(NVML_SUCCESS);
}
#endif

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo_v2(void *device, nvmlPciInfo_t *pci)
{
    ENTER(device, 0);
    fill_pci(T.d, pci);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPciInfo(void *device, nvmlPciInfo_v1_t *pci)
{
    ENTER(device, 0);
    nvmlPciInfo_t full;
    fill_pci(T.d, &full);
    memset(pci, 0, sizeof(*pci));
    memcpy(pci->busId, full.busIdLegacy, sizeof(pci->busId));
    pci->domain = full.domain;
    pci->bus = full.bus;
    pci->device = full.device;
    pci->pciDeviceId = full.pciDeviceId;
    pci->pciSubSystemId = full.pciSubSystemId;
    OUT(NVML_SUCCESS);
}

static nvmlReturn_t by_pci_impl(const char *sym, const char *bus_id, void **device)
{
    target T;
    nvmlReturn_t r = enter(sym, NULL, &T, F_NOHANDLE);
    if (r)
        return r;
    unsigned dom, bus, dev;
    if (!bus_id || !device || sscanf(bus_id, "%x:%x:%x", &dom, &bus, &dev) != 3)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < g_ndev; i++) {
        nvmlPciInfo_t p;
        fill_pci(&g_dev[i], &p);
        if (g_dev[i].vanished || p.domain != dom || p.bus != bus || p.device != dev)
            continue;
        if (g_dev[i].lost)
            OUT(NVML_ERROR_GPU_IS_LOST);
        *device = &g_dev[i];
        OUT(NVML_SUCCESS);
    }
    OUT(NVML_ERROR_NOT_FOUND);
}

/* Both forms take "0000:18:00.0" or "00000000:18:00.0" (hex, any case). */
EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId_v2(const char *bus_id, void **device)
{
    return by_pci_impl(__func__, bus_id, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetHandleByPciBusId(const char *bus_id, void **device)
{
    return by_pci_impl(__func__, bus_id, device);
}

EXPORT nvmlReturn_t nvmlDeviceGetMinorNumber(void *device, unsigned int *minor)
{
    ENTER(device, 0);
    *minor = T.d->minor;
    OUT(NVML_SUCCESS);
}

#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetNumaNodeId(void *device, unsigned int *node)
{
    ENTER(device, 0);
    if (!T.d->has_numa)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    *node = (unsigned)T.d->numa;
    OUT(NVML_SUCCESS);
}
#endif

/* ------------------------------------------------------------------ MIG */

EXPORT nvmlReturn_t nvmlDeviceGetMigMode(void *device, unsigned int *current, unsigned int *pending)
{
    ENTER(device, 0);
    if (!T.d->mig_capable)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    *current = (unsigned)T.d->mig_enabled;
    *pending = (unsigned)T.d->mig_enabled;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMaxMigDeviceCount(void *device, unsigned int *count)
{
    ENTER(device, 0);
    if (!T.d->mig_capable)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    *count = T.d->mig_enabled ? (unsigned)T.d->max_mig : 0;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetMigDeviceHandleByIndex(void *device, unsigned int index, void **mig)
{
    ENTER(device, 0);
    if (!T.d->mig_capable)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    if (!T.d->mig_enabled || index >= (unsigned)T.d->max_mig)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (index >= (unsigned)T.d->nmig)
        OUT(NVML_ERROR_NOT_FOUND);
    *mig = T.d->migs[index];
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetDeviceHandleFromMigDeviceHandle(void *mig, void **device)
{
    ENTER(mig, F_MIG_OK);
    if (!T.m)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    *device = T.d;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceIsMigDeviceHandle(void *device, unsigned int *is_mig)
{
    ENTER(device, F_MIG_OK);
    *is_mig = T.m != NULL;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetGpuInstanceId(void *device, unsigned int *id)
{
    ENTER(device, F_MIG_OK);
    if (!T.m)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    *id = T.m->gi;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeInstanceId(void *device, unsigned int *id)
{
    ENTER(device, F_MIG_OK);
    if (!T.m)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    *id = T.m->ci;
    OUT(NVML_SUCCESS);
}

/* ------------------------------------------------------------- readings */

#define REQUIRE(src)                                                                                                \
    do {                                                                                                            \
        if (!src_ok(T.d, (src)))                                                                                    \
            OUT(NVML_ERROR_NOT_SUPPORTED);                                                                          \
    } while (0)

EXPORT nvmlReturn_t nvmlDeviceGetClockInfo(void *device, int type, unsigned int *clock)
{
    ENTER(device, 0);
    int src;
    switch (type) {
    case 0: /* graphics */
    case 1: /* SM */
    case 3: /* video */
        src = S_SM_CLOCK;
        break;
    case 2:
        src = S_MEM_CLOCK;
        break;
    default:
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    }
    REQUIRE(src);
    *clock = (unsigned)src_u64(T.d, src);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTemperature(void *device, int sensor, unsigned int *temp)
{
    ENTER(device, 0);
    if (sensor != 0)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    REQUIRE(S_GPU_TEMP);
    *temp = (unsigned)src_u64(T.d, S_GPU_TEMP);
    OUT(NVML_SUCCESS);
}

#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetTemperatureV(void *device, nvmlTemperature_v1_t *temp)
{
    ENTER(device, 0);
    if (temp->version != nvmlTemperature_v1)
        OUT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (temp->sensorType != 0)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    REQUIRE(S_GPU_TEMP);
    temp->temperature = (int)src_u64(T.d, S_GPU_TEMP);
    OUT(NVML_SUCCESS);
}
#endif

EXPORT nvmlReturn_t nvmlDeviceGetPowerUsage(void *device, unsigned int *power)
{
    ENTER(device, 0);
    REQUIRE(S_POWER);
    *power = (unsigned)src_u64(T.d, S_POWER);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPowerManagementLimit(void *device, unsigned int *limit)
{
    ENTER(device, 0);
    REQUIRE(S_POWER_LIMIT);
    *limit = (unsigned)src_u64(T.d, S_POWER_LIMIT);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetEnforcedPowerLimit(void *device, unsigned int *limit)
{
    ENTER(device, 0);
    REQUIRE(S_POWER_LIMIT);
    *limit = (unsigned)src_u64(T.d, S_POWER_LIMIT);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEnergyConsumption(void *device, unsigned long long *energy)
{
    ENTER(device, 0);
    REQUIRE(S_ENERGY);
    *energy = src_u64(T.d, S_ENERGY);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPerformanceState(void *device, int *pstate)
{
    ENTER(device, 0);
    REQUIRE(S_PSTATE);
    *pstate = (int)src_u64(T.d, S_PSTATE);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetFanSpeed(void *device, unsigned int *speed)
{
    ENTER(device, 0);
    REQUIRE(S_FAN);
    *speed = (unsigned)src_u64(T.d, S_FAN);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetUtilizationRates(void *device, nvmlUtilization_t *util)
{
    ENTER(device, 0);
    REQUIRE(S_GPU_UTIL);
    util->gpu = (unsigned)src_u64(T.d, S_GPU_UTIL);
    util->memory = src_ok(T.d, S_MEM_UTIL) ? (unsigned)src_u64(T.d, S_MEM_UTIL) : 0;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetEncoderUtilization(void *device, unsigned int *util, unsigned int *period_us)
{
    ENTER(device, 0);
    REQUIRE(S_ENC_UTIL);
    *util = (unsigned)src_u64(T.d, S_ENC_UTIL);
    *period_us = 167000;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetDecoderUtilization(void *device, unsigned int *util, unsigned int *period_us)
{
    ENTER(device, 0);
    REQUIRE(S_DEC_UTIL);
    *util = (unsigned)src_u64(T.d, S_DEC_UTIL);
    *period_us = 167000;
    OUT(NVML_SUCCESS);
}

/* total, reserved, free, used (allocated) in bytes; 0 if not supported */
static int memory_of(const target *t, unsigned long long out[4])
{
    if (t->m) {
        out[0] = t->m->mem_total;
        out[1] = t->m->mem_reserved;
        out[3] = t->m->mem_used;
    } else {
        if (!src_ok(t->d, S_FB_TOTAL))
            return 0;
        out[0] = src_u64(t->d, S_FB_TOTAL);
        out[1] = src_ok(t->d, S_FB_RESERVED) ? src_u64(t->d, S_FB_RESERVED) : 0;
        out[3] = src_ok(t->d, S_FB_USED) ? src_u64(t->d, S_FB_USED) : 0;
    }
    out[2] = out[0] > out[1] + out[3] ? out[0] - out[1] - out[3] : 0;
    return 1;
}

EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo(void *device, nvmlMemory_t *mem)
{
    ENTER(device, F_MIG_OK);
    unsigned long long v[4];
    if (!memory_of(&T, v))
        OUT(NVML_ERROR_NOT_SUPPORTED);
    mem->total = v[0];
    mem->free = v[2];
    mem->used = v[1] + v[3]; /* v1 folds reserved into used */
    OUT(NVML_SUCCESS);
}

#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetMemoryInfo_v2(void *device, nvmlMemory_v2_t *mem)
{
    ENTER(device, F_MIG_OK);
    if (mem->version != nvmlMemory_v2)
        OUT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    unsigned long long v[4];
    if (!memory_of(&T, v))
        OUT(NVML_ERROR_NOT_SUPPORTED);
    mem->total = v[0];
    mem->reserved = v[1];
    mem->free = v[2];
    mem->used = v[3];
    OUT(NVML_SUCCESS);
}
#endif

EXPORT nvmlReturn_t nvmlDeviceGetBAR1MemoryInfo(void *device, nvmlBAR1Memory_t *bar1)
{
    ENTER(device, F_MIG_OK);
    unsigned long long total, used;
    if (T.m) {
        total = T.m->bar1_total;
        used = T.m->bar1_used;
    } else {
        REQUIRE(S_BAR1_TOTAL);
        total = src_u64(T.d, S_BAR1_TOTAL);
        used = src_ok(T.d, S_BAR1_USED) ? src_u64(T.d, S_BAR1_USED) : 0;
    }
    bar1->bar1Total = total;
    bar1->bar1Used = used;
    bar1->bar1Free = total > used ? total - used : 0;
    OUT(NVML_SUCCESS);
}

#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksEventReasons(void *device, unsigned long long *reasons)
{
    ENTER(device, 0);
    REQUIRE(S_CLK_REASONS);
    *reasons = src_u64(T.d, S_CLK_REASONS);
    OUT(NVML_SUCCESS);
}
#endif

EXPORT nvmlReturn_t nvmlDeviceGetCurrentClocksThrottleReasons(void *device, unsigned long long *reasons)
{
    ENTER(device, 0);
    REQUIRE(S_CLK_REASONS);
    *reasons = src_u64(T.d, S_CLK_REASONS);
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetVirtualizationMode(void *device, int *mode)
{
    ENTER(device, 0);
    *mode = T.d->virt_mode;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetGridLicensableFeatures_v4(void *device, nvmlGridLicensableFeatures_t *f)
{
    ENTER(device, 0);
    if (T.d->virt_mode != 2)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    memset(f, 0, sizeof(*f));
    f->isGridLicenseSupported = 1;
    f->licensableFeaturesCount = 1;
    f->gridLicensableFeatures[0].featureCode = 4; /* compute */
    f->gridLicensableFeatures[0].featureState =
        src_ok(T.d, S_VGPU_LICENSE) ? (unsigned)src_u64(T.d, S_VGPU_LICENSE) : 1;
    f->gridLicensableFeatures[0].featureEnabled = 1;
    snprintf(f->gridLicensableFeatures[0].productName, 128, "NVIDIA Virtual Compute Server");
    snprintf(f->gridLicensableFeatures[0].licenseInfo, 128, "NVIDIA-Virtual-Compute-Server,9.0");
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetRemappedRows(void *device, unsigned int *corr, unsigned int *unc,
                                              unsigned int *pending, unsigned int *failure)
{
    ENTER(device, 0);
    REQUIRE(S_REMAP_COR);
    *corr = (unsigned)src_u64(T.d, S_REMAP_COR);
    *unc = src_ok(T.d, S_REMAP_UNC) ? (unsigned)src_u64(T.d, S_REMAP_UNC) : 0;
    *pending = src_ok(T.d, S_REMAP_PEND) ? (unsigned)src_u64(T.d, S_REMAP_PEND) : 0;
    *failure = src_ok(T.d, S_REMAP_FAIL) ? (unsigned)src_u64(T.d, S_REMAP_FAIL) : 0;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetPcieReplayCounter(void *device, unsigned int *value)
{
    ENTER(device, 0);
    REQUIRE(S_REPLAY);
    *value = (unsigned)src_u64(T.d, S_REPLAY);
    OUT(NVML_SUCCESS);
}

/* ------------------------------------------------------------ processes */

/* Processes of the scenario (README: "processes"). A GPU handle lists the GPU's own processes and, with
 * MIG enabled, every instance's with its gi/ci (nvml.h: "In MIG mode, if device handle is provided, the
 * API returns aggregate information"); a MIG handle lists only its instance's. */
#define MAX_LISTED (MAX_PROCS + MAX_MIG_PER_DEV * MAX_MIG_PROCS)

static unsigned collect_procs(const target *t, int kind, const fake_proc **procs, const fake_mig **where)
{
    unsigned n = 0;
    if (t->m) {
        for (int i = 0; i < t->m->nproc; i++)
            if (t->m->procs[i].kinds & kind) {
                procs[n] = &t->m->procs[i];
                where[n++] = t->m;
            }
        return n;
    }
    for (int i = 0; i < t->d->nproc; i++)
        if (t->d->procs[i].kinds & kind) {
            procs[n] = &t->d->procs[i];
            where[n++] = NULL;
        }
    if (!t->d->mig_enabled)
        return n;
    for (int k = 0; k < t->d->nmig; k++)
        for (int i = 0; i < t->d->migs[k]->nproc; i++)
            if (t->d->migs[k]->procs[i].kinds & kind) {
                procs[n] = &t->d->migs[k]->procs[i];
                where[n++] = t->d->migs[k];
            }
    return n;
}

/* v2: infos is nvmlProcessInfo_v2_t[] (also _v3's nvmlProcessInfo_t), else nvmlProcessInfo_v1_t[].
 * PROC_MPS: the MPS clients (scenario kind "mps"), listed only by the MPS variants. */
static nvmlReturn_t procs_impl(const char *sym, void *device, int kind, unsigned int *count, void *infos, int v2)
{
    target T;
    nvmlReturn_t r = enter(sym, device, &T, F_MIG_OK);
    if (r)
        return r;
    if (!count)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    const fake_proc *procs[MAX_LISTED];
    const fake_mig *where[MAX_LISTED];
    unsigned n = collect_procs(&T, kind, procs, where);
    if (*count < n) {
        *count = n;
        OUT(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    if (n > 0 && !infos)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    for (unsigned i = 0; i < n; i++) {
        if (v2) {
            nvmlProcessInfo_v2_t *p = &((nvmlProcessInfo_v2_t *)infos)[i];
            p->pid = procs[i]->pid;
            p->usedGpuMemory = procs[i]->used;
            p->gpuInstanceId = where[i] ? where[i]->gi : NO_ID;
            p->computeInstanceId = where[i] ? where[i]->ci : NO_ID;
        } else {
            nvmlProcessInfo_v1_t *p = &((nvmlProcessInfo_v1_t *)infos)[i];
            p->pid = procs[i]->pid;
            p->usedGpuMemory = procs[i]->used;
        }
    }
    *count = n;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses(void *device, unsigned int *count,
                                                         nvmlProcessInfo_v1_t *infos)
{
    return procs_impl(__func__, device, PROC_COMPUTE, count, infos, 0);
}

/* The _v2 forms and the MPS query came after R450 (NVML 11.0's nvml.h has neither; 11.4's has both). */
#ifdef HAVE_R450_SYMS
EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v2(void *device, unsigned int *count,
                                                            nvmlProcessInfo_v2_t *infos)
{
    return procs_impl(__func__, device, PROC_COMPUTE, count, infos, 1);
}
#endif

EXPORT nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses(void *device, unsigned int *count,
                                                          nvmlProcessInfo_v1_t *infos)
{
    return procs_impl(__func__, device, PROC_GRAPHICS, count, infos, 0);
}

#ifdef HAVE_R450_SYMS

EXPORT nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v2(void *device, unsigned int *count,
                                                             nvmlProcessInfo_v2_t *infos)
{
    return procs_impl(__func__, device, PROC_GRAPHICS, count, infos, 1);
}

EXPORT nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses(void *device, unsigned int *count,
                                                            nvmlProcessInfo_v1_t *infos)
{
    return procs_impl(__func__, device, PROC_MPS, count, infos, 0);
}

EXPORT nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v2(void *device, unsigned int *count,
                                                               nvmlProcessInfo_v2_t *infos)
{
    return procs_impl(__func__, device, PROC_MPS, count, infos, 1);
}
#endif

/* _v3 came with R510 (NVML 11.6): an R470 library lacks it. */
#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetComputeRunningProcesses_v3(void *device, unsigned int *count,
                                                            nvmlProcessInfo_v2_t *infos)
{
    return procs_impl(__func__, device, PROC_COMPUTE, count, infos, 1);
}

EXPORT nvmlReturn_t nvmlDeviceGetGraphicsRunningProcesses_v3(void *device, unsigned int *count,
                                                             nvmlProcessInfo_v2_t *infos)
{
    return procs_impl(__func__, device, PROC_GRAPHICS, count, infos, 1);
}

EXPORT nvmlReturn_t nvmlDeviceGetMPSComputeRunningProcesses_v3(void *device, unsigned int *count,
                                                               nvmlProcessInfo_v2_t *infos)
{
    return procs_impl(__func__, device, PROC_MPS, count, infos, 1);
}
#endif

/* Per-process utilisation (README: "processes" sm/mem/enc/dec). A process with any of them given has
 * one sample, stamped with the CPU time in us: the scenario's "sample_us", else the start of the current
 * UTIL_PERIOD_US period (a new sample every period, as the driver's sampling advances). Only samples
 * newer than lastSeenTimeStamp are returned; none: NOT_FOUND. nvml.h: "On MIG-enabled GPUs, querying
 * process utilization is not currently supported": NOT_SUPPORTED on a MIG handle or a MIG-enabled GPU. */
typedef struct {
    unsigned pid;
    long long at;
    const unsigned *util;
} util_sample;

static unsigned collect_util(const fake_dev *d, unsigned long long last_seen, util_sample *out)
{
    long long now = now_us_realtime();
    long long period_start = now - now % UTIL_PERIOD_US;
    unsigned n = 0;
    for (int i = 0; i < d->nproc; i++) {
        const fake_proc *p = &d->procs[i];
        if (!p->has_util)
            continue;
        long long at = p->sample_us > 0 ? p->sample_us : period_start;
        if ((unsigned long long)at <= last_seen)
            continue;
        out[n].pid = p->pid;
        out[n].at = at;
        out[n++].util = p->util;
    }
    return n;
}

EXPORT nvmlReturn_t nvmlDeviceGetProcessUtilization(void *device, nvmlProcessUtilizationSample_t *utilization,
                                                    unsigned int *count, unsigned long long last_seen)
{
    ENTER(device, 0);
    if (!count)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (T.d->mig_enabled)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    util_sample samples[MAX_PROCS];
    unsigned n = collect_util(T.d, last_seen, samples);
    if (n == 0) {
        *count = 0;
        OUT(NVML_ERROR_NOT_FOUND);
    }
    if (!utilization || *count < n) {
        *count = n;
        OUT(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (unsigned i = 0; i < n; i++) {
        nvmlProcessUtilizationSample_t *s = &utilization[i];
        s->pid = samples[i].pid;
        s->timeStamp = (unsigned long long)samples[i].at;
        s->smUtil = samples[i].util[0];
        s->memUtil = samples[i].util[1];
        s->encUtil = samples[i].util[2];
        s->decUtil = samples[i].util[3];
    }
    *count = n;
    OUT(NVML_SUCCESS);
}

/* NVML 12.4 (R550): an R470 library lacks it. */
#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetProcessesUtilizationInfo(void *device, nvmlProcessesUtilizationInfo_v1_t *info)
{
    ENTER(device, 0);
    if (!info)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (info->version != nvmlProcessesUtilizationInfo_v1)
        OUT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    if (T.d->mig_enabled)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    util_sample samples[MAX_PROCS];
    unsigned n = collect_util(T.d, info->lastSeenTimeStamp, samples);
    if (n == 0) {
        info->processSamplesCount = 0;
        OUT(NVML_ERROR_NOT_FOUND);
    }
    if (!info->procUtilArray || info->processSamplesCount < n) {
        info->processSamplesCount = n;
        OUT(NVML_ERROR_INSUFFICIENT_SIZE);
    }
    for (unsigned i = 0; i < n; i++) {
        nvmlProcessUtilizationInfo_v1_t *s = &info->procUtilArray[i];
        s->timeStamp = (unsigned long long)samples[i].at;
        s->pid = samples[i].pid;
        s->smUtil = samples[i].util[0];
        s->memUtil = samples[i].util[1];
        s->encUtil = samples[i].util[2];
        s->decUtil = samples[i].util[3];
        s->jpgUtil = 0;
        s->ofaUtil = 0;
    }
    info->processSamplesCount = n;
    OUT(NVML_SUCCESS);
}
#endif

/* ------------------------------------------------------------ modes, ECC */

EXPORT nvmlReturn_t nvmlDeviceGetPersistenceMode(void *device, int *mode)
{
    ENTER(device, 0);
    *mode = T.d->persistence;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetDisplayMode(void *device, int *mode)
{
    ENTER(device, 0);
    *mode = T.d->display_mode;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetDisplayActive(void *device, int *active)
{
    ENTER(device, 0);
    *active = T.d->display_active;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetComputeMode(void *device, int *mode)
{
    ENTER(device, 0);
    *mode = T.d->compute_mode;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetCudaComputeCapability(void *device, int *major, int *minor)
{
    ENTER(device, 0);
    *major = T.d->cc_major;
    *minor = T.d->cc_minor;
    OUT(NVML_SUCCESS);
}

/* The driver model (WDDM/TCC) is a Windows notion: Linux drivers export the call and answer NOT_SUPPORTED. */
EXPORT nvmlReturn_t nvmlDeviceGetDriverModel(void *device, int *current, int *pending)
{
    ENTER(device, 0);
    OUT(NVML_ERROR_NOT_SUPPORTED);
}

#ifndef FAKE_OLD_DRIVER
EXPORT nvmlReturn_t nvmlDeviceGetDriverModel_v2(void *device, int *current, int *pending)
{
    ENTER(device, 0);
    OUT(NVML_ERROR_NOT_SUPPORTED);
}
#endif

/* ECC: supported where the scenario serves the ECC counters (DCGM_FI_DEV_ECC_*); the mode is "ecc". */
EXPORT nvmlReturn_t nvmlDeviceGetEccMode(void *device, int *current, int *pending)
{
    ENTER(device, 0);
    REQUIRE(S_ECC_SBE_VOL);
    *current = T.d->ecc_enabled;
    *pending = T.d->ecc_enabled;
    OUT(NVML_SUCCESS);
}

static nvmlReturn_t ecc_total(const target *t, int error_type, int counter_type, unsigned long long *count)
{
    if (error_type < 0 || error_type > 1 || counter_type < 0 || counter_type > 1 || !count)
        return NVML_ERROR_INVALID_ARGUMENT;
    static const int SRC[2][2] = {{S_ECC_SBE_VOL, S_ECC_SBE_AGG}, {S_ECC_DBE_VOL, S_ECC_DBE_AGG}};
    int src = SRC[error_type][counter_type];
    if (!src_ok(t->d, src) || !t->d->ecc_enabled)
        return NVML_ERROR_NOT_SUPPORTED;
    *count = src_u64(t->d, src);
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlDeviceGetTotalEccErrors(void *device, int error_type, int counter_type,
                                                unsigned long long *count)
{
    ENTER(device, 0);
    OUT(ecc_total(&T, error_type, counter_type, count));
}

/* Every error of the ECC counters is put in device memory (DRAM); the other locations count none. */
EXPORT nvmlReturn_t nvmlDeviceGetMemoryErrorCounter(void *device, int error_type, int counter_type, int location,
                                                    unsigned long long *count)
{
    ENTER(device, 0);
    if (location < 0 || location >= NVML_MEMORY_LOCATION_COUNT)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    nvmlReturn_t r = ecc_total(&T, error_type, counter_type, count);
    if (r == NVML_SUCCESS && location != NVML_MEMORY_LOCATION_DRAM)
        *count = 0;
    OUT(r);
}

/* ------------------------------------------------------------------ PCIe */

/* KB/s: the rate of the scenario's PCIe byte counter (a constant counter moves at 0). */
EXPORT nvmlReturn_t nvmlDeviceGetPcieThroughput(void *device, int counter, unsigned int *value)
{
    ENTER(device, 0);
    if (counter < 0 || counter > 1 || !value)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    int src = counter == 0 ? S_PCIE_TX : S_PCIE_RX;
    REQUIRE(src);
    const vspec *v = &T.d->v[src];
    *value = v->kind == V_COUNTER && v->b > 0 ? (unsigned)(v->b / 1024.0) : 0;
    OUT(NVML_SUCCESS);
}

/* --------------------------------------------------------- field values */

enum { FV_U32, FV_U64, FV_MEMTEMP, FV_NVL_TX, FV_NVL_RX };

static const struct {
    unsigned fi;
    int src;
    int how;
    int ecc;
} FV[] = {
    {3, S_ECC_SBE_VOL, FV_U64, 1},   {4, S_ECC_DBE_VOL, FV_U64, 1},   {5, S_ECC_SBE_AGG, FV_U64, 1},
    {6, S_ECC_DBE_AGG, FV_U64, 1},   {29, S_RET_SBE, FV_U64, 0},      {30, S_RET_DBE, FV_U64, 0},
    {31, S_RET_PEND, FV_U32, 0},     {74, S_VIOL_POWER, FV_U64, 0},   {75, S_VIOL_THERMAL, FV_U64, 0},
    {76, S_VIOL_SYNC, FV_U64, 0},    {77, S_VIOL_BOARD, FV_U64, 0},   {78, S_VIOL_LOWUTIL, FV_U64, 0},
    {79, S_VIOL_RELIAB, FV_U64, 0},  {82, S_MEMORY_TEMP, FV_MEMTEMP, 0}, {83, S_ENERGY, FV_U64, 0},
    {94, S_REPLAY, FV_U32, 0},       {138, S_NVLINK, FV_NVL_TX, 0},   {139, S_NVLINK, FV_NVL_RX, 0},
    {142, S_REMAP_COR, FV_U32, 0},   {143, S_REMAP_UNC, FV_U32, 0},   {144, S_REMAP_PEND, FV_U32, 0},
    {145, S_REMAP_FAIL, FV_U32, 0},  {185, S_POWER, FV_U32, 0},       {186, S_POWER, FV_U32, 0},
    {191, S_ENERGY, FV_U64, 0},      {197, S_PCIE_TX, FV_U64, 0},     {198, S_PCIE_RX, FV_U64, 0},
    {230, S_RECOVERY, FV_U32, 0},
};

static void fill_fv(const target *t, nvmlFieldValue_t *v)
{
    int k = -1;
    for (size_t i = 0; i < sizeof(FV) / sizeof(FV[0]); i++)
        if (FV[i].fi == v->fieldId)
            k = (int)i;
    v->timestamp = now_us_realtime();
    v->latencyUsec = 3;
    v->valueType = NVML_VALUE_TYPE_UNSIGNED_LONG_LONG;
    v->value.ullVal = 0;
    if (v->fieldId == NVML_FI_DEV_NVLINK_LINK_COUNT) {
        /* no value spec: the link count is the device's "nvlink_links" */
        v->nvmlReturn = t->m || t->d->nvlink_links <= 0 ? NVML_ERROR_NOT_SUPPORTED : NVML_SUCCESS;
        v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
        v->value.uiVal = t->m ? 0 : (unsigned)t->d->nvlink_links;
        return;
    }
    if (k < 0 || t->m || !src_ok(t->d, FV[k].src)) {
        v->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        return;
    }
    v->nvmlReturn = NVML_SUCCESS;
    if (FV[k].ecc && !t->d->ecc_enabled) {
        /* driver quirk: ECC off leaves the entry uninitialised but "successful" */
        v->timestamp = 0;
        v->latencyUsec = 0;
        v->valueType = NVML_VALUE_TYPE_DOUBLE;
        return;
    }
    unsigned long long x = src_u64(t->d, FV[k].src);
    switch (FV[k].how) {
    case FV_U32:
        v->valueType = NVML_VALUE_TYPE_UNSIGNED_INT;
        v->value.uiVal = (unsigned)x;
        break;
    case FV_U64:
        v->value.ullVal = x;
        break;
    case FV_MEMTEMP:
        /* driver quirk: the value is in uiVal whatever valueType says */
        v->valueType = NVML_VALUE_TYPE_DOUBLE;
        v->value.uiVal = (unsigned)x;
        break;
    case FV_NVL_TX:
    case FV_NVL_RX: {
        unsigned long long part = FV[k].how == FV_NVL_TX ? x / 2 : x - x / 2;
        if (v->scopeId != NO_ID) {
            /* one link's share; a GPU with no link count given keeps the 18 of an H100 SXM */
            unsigned links = t->d->nvlink_links > 0 ? (unsigned)t->d->nvlink_links : 18;
            if (v->scopeId >= links) {
                v->nvmlReturn = NVML_ERROR_INVALID_ARGUMENT;
                return;
            }
            part /= links;
        }
        v->value.ullVal = part;
        break;
    }
    }
}

EXPORT nvmlReturn_t nvmlDeviceGetFieldValues(void *device, int count, nvmlFieldValue_t *values)
{
    ENTER(device, F_MIG_OK);
    if (count < 0 || (count > 0 && !values))
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    for (int i = 0; i < count; i++) {
        count_field(T.gpu, values[i].fieldId);
        fill_fv(&T, &values[i]);
    }
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceGetP2PStatus(void *device1, void *device2, int index, int *status)
{
    ENTER(device1, 0);
    target T2;
    if (resolve(device2, &T2) != NVML_SUCCESS || T2.m)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (T2.d->lost || T2.d->vanished)
        OUT(NVML_ERROR_GPU_IS_LOST);
    if (index < 0 || index > 4)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (index == NVML_P2P_CAPS_INDEX_NVLINK)
        *status = T.d->nvlink_peer[T2.d->cfg_index] ? NVML_P2P_STATUS_OK : NVML_P2P_STATUS_NOT_SUPPORTED;
    else
        *status = T.d != T2.d ? NVML_P2P_STATUS_OK : NVML_P2P_STATUS_NOT_SUPPORTED;
    OUT(NVML_SUCCESS);
}

/* --------------------------------------------------------------- NVLink */

/* Links: the device's "nvlink_links" (18 by default on a GPU with an NVLink peer), all active; link l
 * leads to the l-th peer in turn, so every peer of "nvlink"/"nvlink_peers" is reached. */
static nvmlReturn_t nvlink_check(const target *t, unsigned link)
{
    if (t->d->nvlink_links <= 0)
        return NVML_ERROR_NOT_SUPPORTED;
    if (link >= (unsigned)t->d->nvlink_links)
        return NVML_ERROR_INVALID_ARGUMENT;
    return NVML_SUCCESS;
}

#define NVLINK_TO_SWITCH (-2)
#define NVLINK_TO_NOTHING (-1)

/* Where link l leads: an NVSwitch ("nvlink": "switch"), else the peers with a link width take their
 * links first (position order), and the peers without one share the rest in turn. */
static int nvlink_target(const fake_dev *d, unsigned link)
{
    if (d->nvlink_switch)
        return NVLINK_TO_SWITCH;
    int shared[MAX_DEV], n = 0;
    unsigned base = 0;
    for (int b = 0; b < g_ndev; b++) {
        if (!d->nvlink_peer[b])
            continue;
        if (d->nvlink_width[b]) {
            if (link < base + d->nvlink_width[b])
                return b;
            base += d->nvlink_width[b];
        } else {
            shared[n++] = b;
        }
    }
    return n ? shared[(link - base) % (unsigned)n] : NVLINK_TO_NOTHING;
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkState(void *device, unsigned int link, int *active)
{
    ENTER(device, 0);
    nvmlReturn_t r = nvlink_check(&T, link);
    if (r == NVML_SUCCESS)
        *active = nvlink_target(T.d, link) != NVLINK_TO_NOTHING;
    OUT(r);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkVersion(void *device, unsigned int link, unsigned int *version)
{
    ENTER(device, 0);
    nvmlReturn_t r = nvlink_check(&T, link);
    if (r == NVML_SUCCESS)
        *version = (unsigned)T.d->nvlink_version;
    OUT(r);
}

/* nvmlNvLinkCapability_t: P2P, sysmem access, P2P atomics, sysmem atomics, SLI bridge, valid */
EXPORT nvmlReturn_t nvmlDeviceGetNvLinkCapability(void *device, unsigned int link, int capability,
                                                  unsigned int *result)
{
    static const unsigned CAPS[NVML_NVLINK_CAP_COUNT] = {1, 1, 1, 0, 0, 1};
    ENTER(device, 0);
    nvmlReturn_t r = nvlink_check(&T, link);
    if (r == NVML_SUCCESS && (capability < 0 || capability >= NVML_NVLINK_CAP_COUNT))
        r = NVML_ERROR_INVALID_ARGUMENT;
    if (r == NVML_SUCCESS)
        *result = CAPS[capability];
    OUT(r);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkRemotePciInfo_v2(void *device, unsigned int link, nvmlPciInfo_t *pci)
{
    ENTER(device, 0);
    nvmlReturn_t r = nvlink_check(&T, link);
    int to = r == NVML_SUCCESS ? nvlink_target(T.d, link) : NVLINK_TO_NOTHING;
    if (r == NVML_SUCCESS && to == NVLINK_TO_NOTHING)
        r = NVML_ERROR_NOT_SUPPORTED;
    if (r == NVML_SUCCESS && to == NVLINK_TO_SWITCH) {
        /* four NVSwitches in PCI domain 1 (an HGX H100 board has four), links spread over them */
        fake_dev sw;
        memset(&sw, 0, sizeof(sw));
        snprintf(sw.pci, sizeof(sw.pci), "00000001:%02X:00.0", link % 4);
        sw.pci_device_id = 0x22A310DE;
        fill_pci(&sw, pci);
    } else if (r == NVML_SUCCESS) {
        fill_pci(&g_dev[to], pci);
    }
    OUT(r);
}

EXPORT nvmlReturn_t nvmlDeviceGetNvLinkRemoteDeviceType(void *device, unsigned int link, int *type)
{
    ENTER(device, 0);
    nvmlReturn_t r = nvlink_check(&T, link);
    if (r == NVML_SUCCESS)
        *type = nvlink_target(T.d, link) == NVLINK_TO_SWITCH ? 2 : 0; /* NVML_NVLINK_DEVICE_TYPE_SWITCH, _GPU */
    OUT(r);
}

/* nvmlGpuTopologyLevel_t of two GPUs: "pcie_topology" if given, else the same GPU INTERNAL (0), the same
 * "pcie_switch" SINGLE (10), the same "pcie_root" HOSTBRIDGE (30), the same NUMA node NODE (40), else
 * SYSTEM (50). MIG handles: NOT_SUPPORTED. */
EXPORT nvmlReturn_t nvmlDeviceGetTopologyCommonAncestor(void *device1, void *device2, int *level)
{
    ENTER(device1, 0);
    target T2;
    if (!level || resolve(device2, &T2) != NVML_SUCCESS)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (T2.m)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    if (T2.d->lost || T2.d->vanished)
        OUT(NVML_ERROR_GPU_IS_LOST);
    const fake_dev *a = T.d, *b = T2.d;
    int given = g_pcie_matrix ? g_pcie_level[a->cfg_index][b->cfg_index] : -1;
    if (given >= 0)
        *level = given;
    else if (a == b)
        *level = 0;
    else if (a->pcie_switch >= 0 && a->pcie_switch == b->pcie_switch)
        *level = 10;
    else if (a->pcie_root >= 0 && a->pcie_root == b->pcie_root)
        *level = 30;
    else if (a->has_numa && b->has_numa && a->numa == b->numa)
        *level = 40;
    else
        *level = 50;
    OUT(NVML_SUCCESS);
}

/* --------------------------------------------------------------- events */

static evset *resolve_set(void *set)
{
    uintptr_t p = (uintptr_t)set, b = (uintptr_t)&g_sets[0], e = (uintptr_t)&g_sets[MAX_SETS];
    if (p < b || p >= e || (p - b) % sizeof(evset) != 0)
        return NULL;
    evset *s = &g_sets[(p - b) / sizeof(evset)];
    return s->live ? s : NULL;
}

EXPORT nvmlReturn_t nvmlEventSetCreate(void **set)
{
    ENTER(NULL, F_NOHANDLE);
    for (int i = 0; i < MAX_SETS; i++) {
        if (!g_sets[i].live) {
            memset(&g_sets[i], 0, sizeof(g_sets[i]));
            g_sets[i].live = 1;
            *set = &g_sets[i];
            OUT(NVML_SUCCESS);
        }
    }
    OUT(NVML_ERROR_MEMORY);
}

EXPORT nvmlReturn_t nvmlDeviceGetSupportedEventTypes(void *device, unsigned long long *types)
{
    ENTER(device, 0);
    *types = T.d->supported_events;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlDeviceRegisterEvents(void *device, unsigned long long types, void *set)
{
    ENTER(device, 0);
    evset *s = resolve_set(set);
    if (!s)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (types & ~T.d->supported_events)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    s->registered[T.gpu] = 1;
    s->mask[T.gpu] |= types;
    OUT(NVML_SUCCESS);
}

static nvmlReturn_t wait_impl(const char *sym, void *set, nvmlEventData_t *out, int v2, unsigned timeout_ms)
{
    target T;
    nvmlReturn_t r = enter(sym, NULL, &T, F_NOHANDLE);
    if (r)
        return r;
    evset *s = resolve_set(set);
    if (!s || !out)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    unsigned epoch = g_epoch;
    double end = now_mono() + timeout_ms / 1000.0;
    for (;;) {
        if (g_epoch != epoch)
            OUT(NVML_ERROR_UNINITIALIZED);
        if (!s->live)
            OUT(NVML_ERROR_INVALID_ARGUMENT);
        for (int g = 0; g < g_ndev; g++) {
            if (s->registered[g] && (g_dev[g].lost || g_dev[g].vanished)) {
                out->device = &g_dev[g];
                out->eventType = 0;
                out->eventData = 0;
                if (v2) {
                    out->gpuInstanceId = NO_ID;
                    out->computeInstanceId = NO_ID;
                }
                OUT(NVML_ERROR_GPU_IS_LOST);
            }
        }
        if (s->count > 0) {
            evrec e = s->q[s->head];
            s->head = (s->head + 1) % EVQ;
            s->count--;
            out->device = &g_dev[e.gpu];
            out->eventType = e.type;
            out->eventData = e.data;
            if (v2) {
                out->gpuInstanceId = e.gi;
                out->computeInstanceId = e.ci;
            }
            OUT(NVML_SUCCESS);
        }
        double now = now_mono();
        if (now >= end)
            OUT(NVML_ERROR_TIMEOUT);
        double slice = end - now;
        cv_wait_for(slice > 0.005 ? 0.005 : slice);
        control_poll_locked();
    }
}

#ifdef HAVE_R450_SYMS
EXPORT nvmlReturn_t nvmlEventSetWait_v2(void *set, nvmlEventData_t *data, unsigned int timeoutms)
{
    return wait_impl(__func__, set, data, 1, timeoutms);
}
#endif

EXPORT nvmlReturn_t nvmlEventSetWait(void *set, nvmlEventData_v1_t *data, unsigned int timeoutms)
{
    return wait_impl(__func__, set, (nvmlEventData_t *)data, 0, timeoutms);
}

EXPORT nvmlReturn_t nvmlEventSetFree(void *set)
{
    ENTER(NULL, F_NOHANDLE);
    evset *s = resolve_set(set);
    if (!s)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    s->live = 0;
    pthread_cond_broadcast(&g_cv);
    OUT(NVML_SUCCESS);
}

/* ------------------------------------------------------------------ GPM */

#ifndef FAKE_OLD_DRIVER
#include <stdlib.h>

#define GPM_MAGIC 0x47504D53u /* "GPMS" */

/* What a sample buffer holds: the scenario's GPM values when it was taken. */
struct nvmlGpmSample_st {
    unsigned magic;
    int filled;
    unsigned epoch;
    int gpu;
    unsigned gi; /* NO_ID: whole GPU */
    double t;
    double val[GPM_N];
    int ok[GPM_N];
};

static const struct {
    unsigned id;
    int src;
    const char *short_name, *long_name, *unit;
} GPM_METRICS[] = {
    {1, S_GPM_GR, "gr_util", "graphics utilization", "%"},
    {2, S_GPM_SM, "sm_util", "SM utilization", "%"},
    {3, S_GPM_OCC, "sm_occupancy", "SM occupancy", "%"},
    {5, S_GPM_TENSOR, "any_tensor_util", "any tensor utilization", "%"},
    {10, S_GPM_DRAM, "dram_bw_util", "DRAM bandwidth utilization", "%"},
    {11, S_GPM_FP64, "fp64_util", "FP64 utilization", "%"},
    {12, S_GPM_FP32, "fp32_util", "FP32 utilization", "%"},
    {13, S_GPM_FP16, "fp16_util", "FP16 utilization", "%"},
    {60, S_GPM_NVL_RX, "nvlink_total_rx", "NVLink total RX bandwidth", "MiB/sec"},
    {61, S_GPM_NVL_TX, "nvlink_total_tx", "NVLink total TX bandwidth", "MiB/sec"},
};

static unsigned long long g_gpm_live; /* allocated, not yet freed sample buffers */

EXPORT unsigned long long fakenvml_gpm_samples_live(void)
{
    pthread_mutex_lock(&g_mu);
    unsigned long long n = g_gpm_live;
    pthread_mutex_unlock(&g_mu);
    return n;
}

EXPORT nvmlReturn_t nvmlGpmQueryDeviceSupport(void *device, nvmlGpmSupport_t *support)
{
    ENTER(device, F_MIG_OK);
    if (support == NULL)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (support->version != NVML_GPM_SUPPORT_VERSION)
        OUT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    support->isSupportedDevice = T.d->gpm_supported ? 1 : 0;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlGpmSampleAlloc(nvmlGpmSample_t *sample)
{
    ENTER(NULL, F_NOHANDLE);
    if (sample == NULL)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    struct nvmlGpmSample_st *p = calloc(1, sizeof(*p));
    if (p == NULL)
        OUT(NVML_ERROR_MEMORY);
    p->magic = GPM_MAGIC;
    *sample = p;
    g_gpm_live++;
    OUT(NVML_SUCCESS);
}

EXPORT nvmlReturn_t nvmlGpmSampleFree(nvmlGpmSample_t sample)
{
    ENTER(NULL, F_NOHANDLE);
    if (sample == NULL || sample->magic != GPM_MAGIC)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    sample->magic = 0;
    free(sample);
    g_gpm_live--;
    OUT(NVML_SUCCESS);
}

static nvmlReturn_t gpm_take(target *t, fake_mig *m, nvmlGpmSample_t sample)
{
    if (sample == NULL || sample->magic != GPM_MAGIC)
        return NVML_ERROR_INVALID_ARGUMENT;
    if (!t->d->gpm_supported)
        return NVML_ERROR_NOT_SUPPORTED;
    sample->filled = 1;
    sample->epoch = g_epoch;
    sample->gpu = t->gpu;
    sample->gi = m ? m->gi : NO_ID;
    sample->t = now_mono();
    for (int k = 0; k < GPM_N; k++) {
        int src = S_GPM_FIRST + k;
        const vspec *v = m && m->gpm_set[k] ? &m->gpm[k] : &t->d->v[src];
        sample->ok[k] = v->kind != V_NONE && !(m && (src == S_GPM_NVL_TX || src == S_GPM_NVL_RX));
        sample->val[k] = sample->ok[k] ? vs_eval(v) : 0;
    }
    return NVML_SUCCESS;
}

EXPORT nvmlReturn_t nvmlGpmSampleGet(void *device, nvmlGpmSample_t sample)
{
    ENTER(device, 0);
    OUT(gpm_take(&T, NULL, sample));
}

EXPORT nvmlReturn_t nvmlGpmMigSampleGet(void *device, unsigned int gpuInstanceId, nvmlGpmSample_t sample)
{
    ENTER(device, 0);
    if (!T.d->mig_enabled)
        OUT(NVML_ERROR_NOT_SUPPORTED);
    for (int i = 0; i < T.d->nmig; i++)
        if (T.d->migs[i]->gi == gpuInstanceId)
            OUT(gpm_take(&T, T.d->migs[i], sample));
    OUT(NVML_ERROR_NOT_FOUND);
}

EXPORT nvmlReturn_t nvmlGpmMetricsGet(nvmlGpmMetricsGet_t *mg)
{
    ENTER(NULL, F_NOHANDLE);
    if (mg == NULL)
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (mg->version != NVML_GPM_METRICS_GET_VERSION)
        OUT(NVML_ERROR_ARGUMENT_VERSION_MISMATCH);
    const struct nvmlGpmSample_st *s1 = mg->sample1, *s2 = mg->sample2;
    if (mg->numMetrics > NVML_GPM_METRIC_MAX || s1 == NULL || s2 == NULL || s1->magic != GPM_MAGIC ||
        s2->magic != GPM_MAGIC || !s1->filled || !s2->filled || s1->epoch != g_epoch || s2->epoch != g_epoch ||
        s1->gpu != s2->gpu || s1->gi != s2->gi || !(s2->t > s1->t))
        OUT(NVML_ERROR_INVALID_ARGUMENT);
    if (g_dev[s2->gpu].lost || g_dev[s2->gpu].vanished)
        OUT(NVML_ERROR_GPU_IS_LOST);
    for (unsigned i = 0; i < mg->numMetrics; i++) {
        nvmlGpmMetric_t *out = &mg->metrics[i];
        out->nvmlReturn = NVML_ERROR_NOT_SUPPORTED;
        out->value = 0;
        out->metricInfo.shortName = out->metricInfo.longName = out->metricInfo.unit = NULL;
        for (size_t k = 0; k < sizeof(GPM_METRICS) / sizeof(GPM_METRICS[0]); k++) {
            if (GPM_METRICS[k].id != out->metricId)
                continue;
            int slot = GPM_METRICS[k].src - S_GPM_FIRST;
            out->metricInfo.shortName = (char *)GPM_METRICS[k].short_name;
            out->metricInfo.longName = (char *)GPM_METRICS[k].long_name;
            out->metricInfo.unit = (char *)GPM_METRICS[k].unit;
            if (s2->ok[slot]) {
                out->nvmlReturn = NVML_SUCCESS;
                out->value = s2->val[slot];
            }
        }
    }
    OUT(NVML_SUCCESS);
}
#endif
