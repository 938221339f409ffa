/* Shared state of the fake NVML (state.c) used by the API entry points (api.c). */
#ifndef FAKENVML_STATE_H
#define FAKENVML_STATE_H

#include "fakenvml.h"

#define MAX_DEV 32
#define MAX_MIG_PER_DEV 8
#define MAX_MIG_POOL 1024
#define MAX_SETS 64
#define EVQ 512
#define MAX_RULES 128
#define MAX_SYMS 160
#define MAX_FI 256
#define MAX_PROCS 64     /* per GPU (processes not tied to a MIG instance) */
#define MAX_MIG_PROCS 16 /* per MIG instance */

/* what a scenario process is: bits of fake_proc.kinds */
#define PROC_COMPUTE 0x1
#define PROC_GRAPHICS 0x2
#define PROC_MPS 0x4 /* an MPS client: listed by ...MPSComputeRunningProcesses only */

/* A process's utilisation sample is renewed every UTIL_PERIOD_US (the driver samples about 6 times a
 * second) unless the scenario pins its timestamp ("sample_us"). */
#define UTIL_PERIOD_US 100000LL

#define EV_SBE 0x1ULL
#define EV_DBE 0x2ULL
#define EV_PSTATE 0x4ULL
#define EV_XID 0x8ULL
#define EV_MIG 0x100ULL

enum {
    S_SM_CLOCK,
    S_MEM_CLOCK,
    S_MEMORY_TEMP,
    S_GPU_TEMP,
    S_POWER,
    S_ENERGY,
    S_REPLAY,
    S_GPU_UTIL,
    S_MEM_UTIL,
    S_ENC_UTIL,
    S_DEC_UTIL,
    S_FB_TOTAL,
    S_FB_RESERVED,
    S_FB_USED,
    S_NVLINK,
    S_VGPU_LICENSE,
    S_REMAP_UNC,
    S_REMAP_COR,
    S_REMAP_FAIL,
    S_REMAP_PEND,
    S_ECC_SBE_VOL,
    S_ECC_DBE_VOL,
    S_ECC_SBE_AGG,
    S_ECC_DBE_AGG,
    S_RET_SBE,
    S_RET_DBE,
    S_RET_PEND,
    S_CLK_REASONS,
    S_VIOL_POWER,
    S_VIOL_THERMAL,
    S_VIOL_SYNC,
    S_VIOL_BOARD,
    S_VIOL_LOWUTIL,
    S_VIOL_RELIAB,
    S_POWER_LIMIT,
    S_PSTATE,
    S_FAN,
    S_BAR1_TOTAL,
    S_BAR1_USED,
    S_PCIE_TX,
    S_PCIE_RX,
    S_RECOVERY,
    /* GPM metrics (percent; NVLink: MiB/s), served by nvmlGpmMetricsGet */
    S_GPM_GR,
    S_GPM_SM,
    S_GPM_OCC,
    S_GPM_TENSOR,
    S_GPM_DRAM,
    S_GPM_FP64,
    S_GPM_FP32,
    S_GPM_FP16,
    S_GPM_NVL_TX,
    S_GPM_NVL_RX,
    S_COUNT
};
#define S_GPM_FIRST S_GPM_GR
#define GPM_N (S_COUNT - S_GPM_FIRST)

enum { V_NONE = 0, V_CONST, V_SINE, V_COUNTER };

typedef struct {
    int kind;
    double a, b, c; /* const: a | sine: base a, amplitude b, period c | counter: start a, rate b */
    double t0;      /* monotonic time the spec took effect */
} vspec;

typedef struct {
    unsigned pid;
    unsigned long long used; /* bytes (the scenario gives MiB) */
    int kinds;               /* PROC_COMPUTE | PROC_GRAPHICS, or PROC_MPS */
    int has_util;            /* any of sm/mem/enc/dec given: the process has utilisation samples */
    unsigned util[4];        /* sm, mem, enc, dec percent */
    long long sample_us;     /* >0: the sample's fixed CPU timestamp (us); 0: advances every UTIL_PERIOD_US */
} fake_proc;

typedef struct {
    int live;
    int parent;
    int slot;
    unsigned gi, ci;
    char profile[32];
    char uuid[96];
    unsigned long long mem_total, mem_reserved, mem_used, bar1_total, bar1_used;
    vspec gpm[GPM_N];    /* per GPU instance GPM values */
    int gpm_set[GPM_N]; /* 0: use the parent's */
    fake_proc procs[MAX_MIG_PROCS];
    int nproc;
} fake_mig;

typedef struct {
    int cfg_index;
    char name[96];
    char uuid[96];
    char pci[32];
    unsigned pci_device_id, pci_subsys;
    unsigned minor;
    int has_numa, numa;
    int ecc_enabled;
    int virt_mode;
    int gpm_supported;
    unsigned long long supported_events;
    int supported_events_set;
    int mig_capable, mig_enabled, max_mig;
    fake_mig *migs[MAX_MIG_PER_DEV];
    int nmig;
    vspec v[S_COUNT];
    unsigned char nvlink_peer[MAX_DEV];
    int nvlink_links;   /* -1: not given (18 if the GPU has an NVLink peer, else 0) */
    /* Per peer link widths ("nvlink_peers" as an object); 0: the peer shares the links left in turn. */
    unsigned char nvlink_width[MAX_DEV];
    int nvlink_switch;  /* 1: every link leads to an NVSwitch ("nvlink": "switch", "nvlink_switch") */
    int pcie_switch, pcie_root; /* -1: not given; PCIe topology groups for nvmlDeviceGetTopologyCommonAncestor */
    int nvlink_version;
    int persistence, display_mode, display_active, compute_mode;
    int cc_major, cc_minor;
    /* Static facts for label fields: "" (brand -1) means the call answers NOT_SUPPORTED. */
    char serial[32], vbios[32], inforom_oem[16], inforom_ecc[16], inforom_power[16], inforom_image[32];
    int brand;
    fake_proc procs[MAX_PROCS];
    int nproc;
    int lost, vanished;
    unsigned hang_gen;
} fake_dev;

typedef struct {
    int gpu;
    unsigned long long type, data;
    unsigned gi, ci;
} evrec;

typedef struct {
    int live;
    unsigned char registered[MAX_DEV];
    unsigned long long mask[MAX_DEV];
    evrec q[EVQ];
    int head, count;
} evset;

enum { RULE_ERROR = 1, RULE_HANG = 2 };

typedef struct {
    int used;
    int kind;
    int gpu; /* -1: any */
    char call[96];
    int code;
    double seconds;
    long remaining; /* <0: unlimited */
} rule;

extern pthread_mutex_t g_mu;
extern pthread_cond_t g_cv;
extern int g_refcount;
extern unsigned g_epoch;
extern fake_dev g_dev[MAX_DEV];
extern int g_ndev;
/* "pcie_topology": an explicit matrix of nvmlGpuTopologyLevel_t values (g_pcie_matrix set), else -1. */
extern int g_pcie_level[MAX_DEV][MAX_DEV];
extern int g_pcie_matrix;
extern fake_mig g_mig_pool[MAX_MIG_POOL];
extern int g_nmig_pool;
extern evset g_sets[MAX_SETS];
extern char g_driver[80];
extern char g_nvml_version[96];
extern int g_cuda_version;

double now_mono(void);
long long now_us_realtime(void);
void cv_wait_for(double seconds);
int source_by_name(const char *name);
double vs_eval(const vspec *s);
int src_ok(const fake_dev *d, int src);
double src_val(const fake_dev *d, int src);
unsigned long long src_u64(const fake_dev *d, int src);
void count_call(const char *sym, int gpu);
void count_field(int gpu, unsigned fi);
nvmlReturn_t load_config_locked(void);
void shutdown_locked(void);
void control_poll_locked(void);
rule *find_rule(int kind, const char *sym, int gpu);
void consume_rule(rule *r);

#endif
