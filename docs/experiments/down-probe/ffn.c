/* FFN probe (docs/performance.md, 2026-12-07 20:30-21:30): GRIFFIN's fused FFN pattern, per layer copy (128 of
 * them, ~96 MB) and chunk of ROWS kept neurons: r16 gate rows, r16 up rows (768 x 576 each), then the quads down
 * rows, timed by part.   ./ffn ROWS [WIDE] [ONLY: 1 down only, 2 gate/up only]; env as probe.c. */
int KN_AHEAD=2, KN_PF=1, KN_INIT=1, KN_AB=0, KN_HINT=2, KN_PM=0, KN_SKIP=0, KN_R16PF=8192, KN_QPF=0, KN_PIPE=0, KN_FAST=0;
#include "quant_gemv.c"
#include <stdio.h>
#include <sys/mman.h>
static uint64_t rd(void){ unsigned lo,hi; __asm__ volatile("rdtsc":"=a"(lo),"=d"(hi)); return ((uint64_t)hi<<32)|lo; }
static void *huge(size_t n){ void *p=NULL; posix_memalign(&p, 2<<20, (n+(2<<20)-1)&~(size_t)((2<<20)-1)); madvise(p,n,MADV_HUGEPAGE); memset(p,1,n); return p;}
int main(int argc,char**argv){
  int CH=atoi(argv[1]); int wide=argc>2?atoi(argv[2]):1; int only=argc>3?atoi(argv[3]):0; /* only: 1 down only, 2 gate/up only */
  if(getenv("AH")) KN_AHEAD=atoi(getenv("AH")); if(getenv("PM")) KN_PM=atoi(getenv("PM")); if(getenv("AB")) KN_AB=atoi(getenv("AB")); if(getenv("R16PF")) KN_R16PF=atoi(getenv("R16PF"));
  if(getenv("SKIP")) KN_SKIP=atoi(getenv("SKIP")); if(getenv("FAST")) KN_FAST=atoi(getenv("FAST")); if(getenv("PIPE")) KN_PIPE=atoi(getenv("PIPE")); if(getenv("QPF")) KN_QPF=atoi(getenv("QPF")); if(getenv("PF")) KN_PF=atoi(getenv("PF")); if(getenv("INIT")) KN_INIT=atoi(getenv("INIT"));
  const int64_t K=768, D=576, NL=128;
  QMat d={0}; d.rows=K; d.cols=D; d.block=32; d.bits=4; d.scale_fp32=0;
  uint8_t *codes=malloc(K*D/2); uint16_t *sc=malloc(K*D/32*2);
  for(int64_t i=0;i<K*D/2;i++) codes[i]=rand(); for(int64_t i=0;i<K*D/32;i++) sc[i]=0x3c00+(rand()&0x3ff);
  d.codes=codes; d.scales=sc;
  const int64_t qb=caprese_qa_quads_bytes(&d), gb=K*D/2, gs=K*D/32*2, per=(2*(gb+gs)+qb+4095)/4096*4096;
  uint8_t *buf=huge(per*NL);
  uint8_t *tmpq=malloc(qb); caprese_qa_pack_quads(&d,tmpq);
  for(int l=0;l<NL;l++){ uint8_t *b=buf+l*per; for(int64_t i=0;i<2*(gb+gs);i++) b[i]=rand(); uint16_t *s1=(uint16_t*)(b+gb), *s2=(uint16_t*)(b+2*gb+gs);
    for(int64_t i=0;i<K*D/32;i++){ s1[i]=0x3c00+(rand()&0x3ff); s2[i]=0x3c00+(rand()&0x3ff);} memcpy(b+2*(gb+gs), tmpq, qb);}
  float h[D], z[K], y[D]; for(int i=0;i<D;i++) h[i]=(rand()%2000-1000)/1000.0f; for(int i=0;i<K;i++) z[i]=(rand()%2000-1000)/1000.0f;
  QMat g=d; g.layout=QG_R16; g.rows=K; g.cols=D; void *xbuf=malloc(caprese_qx_bytes(D)); QgX xq; g.codes=buf; g.scales=buf+gb; caprese_qx_quantize(&g,h,xbuf,&xq);
  double best=1e30, bd=0, bg=0; float gu[2*K];
  for(int rep=0;rep<15;rep++){
    uint64_t tdown=0, tgu=0, t0=rd();
    for(int l=0;l<NL;l++){ uint8_t *b=buf+l*per; QMat G=g, U=g; G.codes=b; G.scales=b+gb; U.codes=b+gb+gs; U.scales=b+2*gb+gs;
      for(int64_t r=0;r<K;r+=CH){ int64_t r1=r+CH<K?r+CH:K; uint64_t a=rd();
        if(only!=1){ qx_r16_rows(&G,&xq,NULL,r,r1,gu); qx_r16_rows(&U,&xq,NULL,r,r1,gu+K);} uint64_t bb=rd();
        if(only!=2) caprese_q_rows_axpy_quads(&d, b+2*(gb+gs), wide, z, r, r1, K, y);
        tgu+=bb-a; tdown+=rd()-bb; } }
    double s=(rd()-t0)/2.596e9; if(s<best){best=s; bd=tdown/2.596e9; bg=tgu/2.596e9;}
  }
  double bytes_gu=2.0*(gb+gs)*NL, bytes_d=(double)qb*NL;
  printf("CH %d wide %d only %d: total %.3f ms (%.1f GB/s) | gate/up %.3f ms %.1f GB/s | down %.3f ms %.1f GB/s\n",CH,wide,only,best*1e3,
    ((only!=1?bytes_gu:0)+(only!=2?bytes_d:0))/best/1e9, bg*1e3, bytes_gu/bg/1e9, bd*1e3, bytes_d/bd/1e9);
  return 0;
}
